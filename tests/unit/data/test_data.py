"""Images to tensors: decode, colour order, transforms, datasets."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from darkroom.data.images import (
    ImageDataset,
    SafeImageDataset,
    UnreadableImage,
    augmentation,
    build_transform,
    read_rgb,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _write(path, img) -> str:
    assert cv2.imwrite(str(path), img)
    return str(path)


def test_read_rgb_converts_bgr_to_rgb(tmp_path):
    blue_bgr = np.zeros((8, 10, 3), np.uint8)
    blue_bgr[..., 0] = 255  # OpenCV's channel 0 is blue
    rgb = read_rgb(_write(tmp_path / "blue.png", blue_bgr))
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 255).all()  # blue is last in RGB
    assert (rgb[..., :2] == 0).all()


def test_read_rgb_grey_gives_three_channels(tmp_path):
    grey = np.full((6, 6), 77, np.uint8)
    rgb = read_rgb(_write(tmp_path / "g.png", grey))
    assert rgb.shape == (6, 6, 3)
    assert (rgb == 77).all()


def test_read_rgb_composites_alpha_on_white(tmp_path):
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 1] = 200
    bgra[..., 3] = 10  # nearly transparent: mostly the white background shows
    rgb = read_rgb(_write(tmp_path / "a.png", bgra))
    assert rgb.shape == (4, 4, 3)
    assert (rgb == [245, 253, 245]).all()  # round((c * 10 + 255 * 245) / 255)


@pytest.mark.parametrize("content", [b"not an image", b""])
def test_read_rgb_unreadable(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImage, match="bad.png"):
        read_rgb(str(path))


def test_read_rgb_missing_file(tmp_path):
    with pytest.raises(UnreadableImage):
        read_rgb(str(tmp_path / "absent.png"))


@pytest.mark.parametrize("augment", ["none", "soft", "no-flip"])
def test_transform_shape_and_dtype(augment):
    img = np.random.default_rng(0).integers(0, 256, (40, 23, 3), dtype=np.uint8)
    out = build_transform(24, MEAN, STD, augment)(image=img)["image"]
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 24, 24)
    assert out.dtype == torch.float32


def test_transform_normalizes_per_channel():
    img = np.full((10, 10, 3), 128, np.uint8)
    out = build_transform(16, MEAN, STD, "none")(image=img)["image"]
    for c in range(3):
        expected = (128 / 255 - MEAN[c]) / STD[c]
        assert out[c].mean().item() == pytest.approx(expected, abs=1e-3)
        assert out[c].std().item() < 1e-4


def test_transform_keeps_channel_order():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # red in RGB
    out = build_transform(8, (0, 0, 0), (1, 1, 1), "none")(image=img)["image"]
    assert out[0].min().item() == pytest.approx(1.0)
    assert out[1:].abs().max().item() == 0.0


def _types(compose: A.Compose) -> set[type]:
    return {type(t) for t in compose.transforms}


def test_soft_flips_no_flip_does_not():
    soft = _types(build_transform(32, MEAN, STD, "soft"))
    no_flip = _types(build_transform(32, MEAN, STD, "no-flip"))
    none = _types(build_transform(32, MEAN, STD, "none"))
    assert A.HorizontalFlip in soft
    assert A.HorizontalFlip not in no_flip
    assert {A.Rotate, A.CoarseDropout} <= soft & no_flip
    assert none.isdisjoint({A.HorizontalFlip, A.Rotate, A.CoarseDropout})
    assert A.Resize in none and A.Normalize in none


@pytest.mark.parametrize("augment", ["none", "soft", "no-flip"])
def test_augmentation_is_the_transform_between_resize_and_normalize(augment):
    full = build_transform(32, MEAN, STD, augment).transforms
    middle = augmentation(32, augment)
    assert [repr(t) for t in middle.transforms] == [repr(t) for t in full[1:-2]]
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = middle(image=img)["image"]
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)  # pixels stay bytes
    if augment == "none":
        assert np.array_equal(out, img)


def test_unknown_augment():
    with pytest.raises(ValueError, match="heavy"):
        build_transform(32, MEAN, STD, "heavy")
    with pytest.raises(ValueError, match="heavy"):
        augmentation(32, "heavy")


def test_image_dataset(tmp_path):
    paths = [_write(tmp_path / f"{i}.png", np.full((12, 12), 40 * i, np.uint8)) for i in range(3)]
    ds = ImageDataset(paths, [2, 0, 1], build_transform(16, MEAN, STD))
    assert len(ds) == 3
    image, label = ds[0]
    assert image.shape == (3, 16, 16)
    assert label.dtype == torch.long and label.item() == 2
    assert ds[2][1].item() == 1
    assert ImageDataset(paths, None, build_transform(16, MEAN, STD))[1][1].item() == -1


def test_image_dataset_raises_on_unreadable(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    ds = ImageDataset([str(tmp_path / "bad.png")], [0], build_transform(16, MEAN, STD))
    with pytest.raises(UnreadableImage):
        ds[0]


def test_safe_dataset_flags_unreadable(tmp_path):
    good = _write(tmp_path / "good.png", np.full((12, 12, 3), 200, np.uint8))
    (tmp_path / "bad.png").write_bytes(b"junk")
    ds = SafeImageDataset([good, str(tmp_path / "bad.png"), ""], build_transform(16, MEAN, STD), 16)
    image, i, ok = ds[0]
    assert (i, ok) == (0, True)
    assert image.shape == (3, 16, 16) and image.abs().sum() > 0
    image, i, ok = ds[1]
    assert (i, ok) == (1, False)
    assert image.shape == (3, 16, 16)
    assert ds[2][2] is False  # no local file at all (fetch failed)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch[2].tolist() == [True, False, False]
    assert batch[1].tolist() == [0, 1, 2]
