"""A model version as a timm hub folder: ``timm.create_model("local-dir:...")`` and timm's transforms.

Real files throughout: safetensors weights from ``darkroom.model.to_bytes``, ``config.json`` from
``darkroom.model.hub_config``, and PNG/JPEG digits written with OpenCV.

Measured (timm 1.0.31, torchvision's PIL resize vs albumentations/cv2 INTER_LINEAR, 32 px):
mean abs difference per image, in normalised units, 0 for 32x32 images (no resize), up to
0.004 (test_resnet, std 0.5) and 0.009 (ImageNet std) for 40x30 and 30x40, up to 0.013 for
64x48 (largest single value 0.105). PIL antialiases when shrinking and cv2 does not, so large
downscales of detailed photos differ much more (about 0.2 at 640x480 -> 224 on a noisy
texture); the tolerances below are for these small digit images.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from darkroom.data.images import build_transform, read_rgb
from darkroom.model.backbone import hub_config, mean_std, to_bytes

CLASSES = ["zero", "one", "two"]
SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_ABS_TOL = 0.05  # measured at most 0.013 (see the module docstring)
MAX_ABS_TOL = 0.3  # measured at most 0.105
DIGITS = load_digits()


def _model(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=len(CLASSES))
    with torch.no_grad():  # not timm's default head init, so loading it is visible
        head = model.get_classifier()
        head.weight.add_(torch.randn_like(head.weight))
        head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    return model.eval()


def _export(model, backbone, folder, mean, std):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(to_bytes(model))
    config = hub_config(model, backbone, CLASSES, SIZE, mean, std)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _digit(i: int, width: int, height: int) -> np.ndarray:
    """A BGR digit from scikit-learn, colour so that a BGR/RGB mix-up would show."""
    grey = (DIGITS.data[i].reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8)
    grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_CUBIC)
    return cv2.merge([grey, 255 - grey, grey // 2])


@pytest.mark.parametrize("backbone", ["test_resnet", "resnet18"])
def test_local_dir_loads_the_same_model(tmp_path, backbone):
    model = _model(backbone)
    mean, std = mean_std(model)
    folder = _export(model, backbone, tmp_path / "v", mean, std)

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()

    assert type(loaded) is type(model)
    assert loaded.num_classes == len(CLASSES)
    assert loaded.pretrained_cfg["label_names"] == CLASSES
    assert loaded.pretrained_cfg["source"] == "local-dir"
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, SIZE, SIZE)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    state = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_config_json_is_timms_format(tmp_path):
    model = _model("test_resnet")
    config = hub_config(model, "test_resnet", CLASSES, SIZE, [0.5] * 3, [0.25] * 3)
    assert config["architecture"] == "test_resnet"
    assert config["num_classes"] == 3
    assert config["num_features"] == model.num_features
    assert config["global_pool"] == "avg"
    assert config["label_names"] == CLASSES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, SIZE, SIZE]
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bilinear", 1.0, "squash")
    assert cfg["num_classes"] == 3
    assert not {"url", "file", "hf_hub_id", "source", "test_input_size"} & set(cfg)

    # timm's own exporter, given the same labels and preprocessing, writes the same config.
    timm.models.save_for_hf(
        model,
        str(tmp_path / "timm"),
        model_config={"label_names": CLASSES},
        safe_serialization=True,
        data_config={
            "input_size": (3, SIZE, SIZE),
            "mean": (0.5,) * 3,
            "std": (0.25,) * 3,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "squash",
        },
    )
    assert json.loads((tmp_path / "timm" / "config.json").read_text()) == config


def test_tagged_backbone_names_the_architecture():
    model = _model("resnet18")
    config = hub_config(model, "resnet18.a1_in1k", CLASSES, SIZE, IMAGENET_MEAN, IMAGENET_STD)
    assert config["architecture"] == "resnet18"


def test_hub_config_refuses_a_mismatch():
    model = _model("test_resnet")
    with pytest.raises(ValueError, match="4 classes"):
        hub_config(model, "test_resnet", [*CLASSES, "three"], SIZE, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="resnet18"):
        hub_config(model, "resnet18", CLASSES, SIZE, [0.5] * 3, [0.5] * 3)


def _train(model, mean, std, tmp_path) -> torch.nn.Module:
    """A few steps on real digits 0/1/2, so predictions are decisive rather than near ties."""
    digits = DIGITS
    transform = build_transform(SIZE, mean, std, "none")
    idx = [i for i in range(len(digits.target)) if digits.target[i] < 3][:60]
    xs = []
    for i in idx:
        path = tmp_path / f"train-{i}.png"
        assert cv2.imwrite(str(path), _digit(i, SIZE, SIZE))
        xs.append(transform(image=read_rgb(str(path)))["image"])
    x, y = torch.stack(xs), torch.tensor(digits.target[idx], dtype=torch.long)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():  # settle BatchNorm's running statistics on the final weights
        for _ in range(20):
            model(x)
    return model.eval()


@pytest.mark.parametrize(
    "stats",
    [None, (IMAGENET_MEAN, IMAGENET_STD)],
    ids=["test_resnet-stats", "imagenet-stats"],
)
def test_timm_transform_reproduces_darkroom_preprocessing(tmp_path, stats):
    backbone = "test_resnet"  # resnet18 is loaded above; the preprocessing is the backbone's
    model = _model(backbone)
    mean, std = stats or mean_std(model)
    model = _train(model, mean, std, tmp_path)
    folder = _export(model, backbone, tmp_path / "v", mean, std)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()

    data_config = timm.data.resolve_data_config({}, model=loaded)
    assert data_config == timm.data.resolve_model_data_config(loaded)
    assert data_config == timm.data.resolve_data_config({}, model=loaded, use_test_size=True)
    assert tuple(data_config["input_size"]) == (3, SIZE, SIZE)
    assert (data_config["crop_mode"], data_config["crop_pct"]) == ("squash", 1.0)
    timm_transform = timm.data.create_transform(**data_config)
    darkroom_transform = build_transform(SIZE, mean, std, "none")

    # (width, height): no resize, wider, taller, larger; PNG and JPEG; digits 0/1/2 not trained on.
    shapes = [(32, 32), (40, 30), (30, 40), (64, 48)]
    unseen = [i for i in range(len(DIGITS.target)) if DIGITS.target[i] < 3][-len(shapes) :]
    paths = []
    for i, (w, h) in zip(unseen, shapes, strict=True):
        for ext in (".png", ".jpg"):
            path = tmp_path / f"digit-{i}-{w}x{h}{ext}"
            assert cv2.imwrite(str(path), _digit(i, w, h))
            paths.append(path)

    ours = torch.stack([darkroom_transform(image=read_rgb(str(p)))["image"] for p in paths])
    theirs = []
    for p in paths:
        with Image.open(p) as im:
            theirs.append(timm_transform(im.convert("RGB")))
    theirs = torch.stack(theirs)

    assert ours.shape == theirs.shape == (len(paths), 3, SIZE, SIZE)
    diff = (ours - theirs).abs()
    for p, d in zip(paths, diff, strict=True):
        assert d.mean() < MEAN_ABS_TOL, (p.name, float(d.mean()))
        assert d.max() < MAX_ABS_TOL, (p.name, float(d.max()))
    # unresized images are the same to float rounding (same decoder output, same normalisation)
    assert torch.allclose(ours[:2], theirs[:2], atol=1e-5)

    with torch.no_grad():
        ours_logits, theirs_logits = model(ours), loaded(theirs)
    # Measured: top-1/top-2 logit margins 1.6 to 20, logit differences at most 1.8 and at
    # most a fifth of that image's margin.
    assert torch.equal(ours_logits.argmax(1), theirs_logits.argmax(1))


@pytest.mark.slow
def test_a_trained_version_loads_in_timm_and_agrees_with_darkroom_scoring(local_storage, cache_dir):
    """The path a user takes: a version darkroom trained and scored, loaded with timm's own
    API and transforms, gives darkroom's top-1 on every scored image."""
    from darkroom import layout
    from darkroom.config import ScoreConfig
    from darkroom.scoring.chunks import read_predictions, score_chunk
    from darkroom.scoring.plan import pending_chunks
    from tests.conftest import TINY, train_candidate, write_digits

    write_digits(local_storage, classes=("0", "1", "2"), per_class=15, incoming=120)
    version = train_candidate(local_storage, cache_dir, TINY.model_copy(update={"epochs": 2}))
    config = ScoreConfig(storage=local_storage.uri, cache_dir=str(cache_dir), device="cpu")
    for chunk in pending_chunks(local_storage, version, chunk_size=64).chunks:
        score_chunk(local_storage, config, version, chunk)
    preds = read_predictions(local_storage, version)
    assert len(preds) == 120 and (preds["status"] == "ok").all()

    folder = local_storage.local_path(layout.version(version, "config.json")).parent
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config)
    labels = model.pretrained_cfg["label_names"]
    with torch.no_grad():
        batch = torch.stack(
            [
                transform(Image.open(local_storage.local_path(k)).convert("RGB"))
                for k in preds["key"]
            ]
        )
        timm_top1 = [labels[i] for i in model(batch).argmax(1).tolist()]
    assert timm_top1 == preds["label"].tolist()
