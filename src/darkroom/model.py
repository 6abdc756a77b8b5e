"""timm backbones in and out of safetensors."""

from __future__ import annotations

import hashlib
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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
