"""timm backbones in and out of safetensors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from darkroom.config import TrainConfig


def create_model(cfg: TrainConfig, num_classes: int, *, pretrained: bool | None = None):
    """``timm.create_model`` with the config's backbone and weights source.

    A ``pretrained_file`` goes through timm's own loader (``pretrained_cfg_overlay``), so a
    classifier head of another size is re-initialised and the backbone weights are kept.
    """
    pretrained = cfg.pretrained if pretrained is None else pretrained
    kwargs = {}
    if pretrained and cfg.pretrained_file:
        path = Path(cfg.pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_file {path} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return timm.create_model(
            cfg.backbone, pretrained=pretrained, num_classes=num_classes, **kwargs
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(
                f"unknown timm backbone {cfg.backbone!r}: see timm.list_models()"
            ) from None
        raise


class PretrainedUnavailable(ValueError):
    """Pretrained weights were asked for and cannot be had here."""


@contextlib.contextmanager
def _hub_offline():
    # huggingface_hub reads its offline switch per call: this asks the local cache only,
    # instead of retrying an unreachable hub for most of a minute.
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_pretrained(cfg: TrainConfig) -> None:
    """Fails at once, naming the ways out, when ``cfg`` asks for pretrained weights that are
    neither in the local cache nor downloadable (a machine without internet access).

    Raises:
        PretrainedUnavailable: neither the cache nor the hub has them.
        FileNotFoundError: ``pretrained_file`` is a local path that does not exist.
    """
    if not cfg.pretrained:
        return
    if cfg.pretrained_file:
        if (
            "://" not in cfg.pretrained_file
            and not Path(cfg.pretrained_file).expanduser().is_file()
        ):
            raise FileNotFoundError(f"pretrained_file {cfg.pretrained_file} does not exist")
        return
    try:
        with _hub_offline():
            create_model(cfg, 2)  # weights already in the cache: nothing to download
        return
    except (OSError, RuntimeError, ValueError):
        pass
    if not _hub_reachable():
        raise PretrainedUnavailable(
            f"pretrained weights for {cfg.backbone!r} are not in the local cache and the "
            "Hugging Face hub cannot be reached: pass --pretrained-file PATH (the backbone's "
            ".safetensors/.pth) or --no-pretrained to train from scratch"
        )


def mean_std(model) -> tuple[list[float], list[float]]:
    """The backbone's normalisation from timm's data config (ImageNet's for most)."""
    dc = timm.data.resolve_data_config({}, model=model)
    return [float(x) for x in dc["mean"]], [float(x) for x in dc["std"]]


def to_bytes(model: torch.nn.Module) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_weights(model: torch.nn.Module, data: bytes, expected_sha256: str | None = None):
    """Loads safetensors bytes into ``model``; refuses bytes whose hash does not match."""
    if expected_sha256 and sha256(data) != expected_sha256:
        raise ValueError(
            f"weights do not match the sha256 recorded in model.json ({expected_sha256[:12]}...): "
            "the file was changed or truncated; retrain or restore it"
        )
    model.load_state_dict(st_load(data))
    return model


def hub_config(
    model: torch.nn.Module,
    backbone: str,
    classes: Sequence[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict:
    """timm's hub ``config.json`` for a model version, as ``timm.models.save_for_hf`` writes it
    (through timm's own ``save_config_for_hf``). Beside ``model.safetensors`` it makes the
    folder load with ``timm.create_model("local-dir:<folder>", pretrained=True)``, class names
    in ``pretrained_cfg["label_names"]``; timm's ``resolve_data_config`` + ``create_transform``
    then squash to ``image_size`` and normalise as darkroom does (up to PIL's antialiased
    resize versus OpenCV's).

    Raises:
        ValueError: the model is not a ``backbone``, or its head does not fit ``classes``.
    """
    from timm.models import get_arch_name
    from timm.models._hub import save_config_for_hf

    arch, model_arch = get_arch_name(backbone), model.pretrained_cfg.get("architecture")
    if model_arch != arch:
        raise ValueError(f"the model is a timm {model_arch!r}, not the backbone {backbone!r}")
    classes = [str(c) for c in classes]
    if model.num_classes != len(classes):
        raise ValueError(f"the model has {model.num_classes} outputs for {len(classes)} classes")
    data_config = {
        "input_size": (3, int(image_size), int(image_size)),
        "mean": tuple(float(x) for x in mean),
        "std": tuple(float(x) for x in std),
        "interpolation": "bilinear",  # albumentations' A.Resize default, cv2.INTER_LINEAR
        "crop_pct": 1.0,
        "crop_mode": "squash",  # A.Resize(image_size, image_size): no aspect ratio, no crop
    }
    with tempfile.TemporaryDirectory(prefix="darkroom-hub-") as tmp:
        path = Path(tmp) / "config.json"
        model_config = {"num_classes": len(classes), "label_names": classes}
        save_config_for_hf(model, str(path), model_config=model_config, data_config=data_config)
        config = json.loads(path.read_text())
    # A test-time size would override darkroom's (use_test_size); the root label_names are the
    # ones timm's loader uses, so a source checkpoint's labels must not linger.
    for key in ("test_input_size", "test_crop_pct", "label_names", "label_descriptions"):
        config["pretrained_cfg"].pop(key, None)
    return config


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
