"""Hostile and unusual images: limits read from the header before decoding, reduced-scale
JPEG decoding, and every colour layout decoded to the RGB a viewer shows. Every image here is
a real file written by Pillow, OpenCV or (the 900-megapixel PNG) by hand."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from darkroom import layout
from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.data import rows as rows_module
from darkroom.data.headers import _png_header, pillow_header
from darkroom.data.images import (
    BACKGROUND,
    ImageDataset,
    ImageTooLarge,
    SafeImageDataset,
    UnreadableImage,
    build_transform,
    decode_rgb,
    read_header,
    read_rgb,
)
from darkroom.data.index import read_index, rebuild_index, write_index
from darkroom.data.rows import build_index, describe_image
from darkroom.data.sync import sync_labeled, sync_prefix
from darkroom.model.backbone import sha256, to_bytes
from darkroom.model.inference import LoadedModel
from tests.conftest import TINY, png_bytes, write_digits
from tests.hostile import BATTERY

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
HUGE_ERROR = "30000x30000 = 900,000,000 pixels exceeds max_image_pixels 178,956,970"
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---- helpers: real files --------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def cv_bytes(ext: str, img: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def stripes(*colours, size: int = 16) -> np.ndarray:
    """RGB vertical stripes, one ``size`` x ``size`` block per colour, left to right."""
    return np.concatenate([np.full((size, size, 3), c, np.uint8) for c in colours], axis=1)


# ---- colour layouts: each a real file, decoded to what a viewer shows ------------------------


def test_rgba_png_is_composited_on_white(tmp_path):
    bgra = np.zeros((1, 3, 4), np.uint8)
    bgra[0, 0] = (0, 0, 255, 255)  # opaque red
    bgra[0, 1] = (0, 255, 0, 0)  # green hidden under full transparency
    bgra[0, 2] = (255, 0, 0, 128)  # half-transparent blue
    rgb = read_rgb(write(tmp_path / "a.png", cv_bytes(".png", bgra)))
    assert BACKGROUND == WHITE
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0].tolist() == [list(RED), list(WHITE), [127, 127, 255]]


def test_training_and_scoring_decode_the_same_pixels(tmp_path):
    bgra = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    path = write(tmp_path / "a.png", cv_bytes(".png", bgra))
    tf = build_transform(16, MEAN, STD)
    train = ImageDataset([path], [0], tf)
    score = SafeImageDataset([path], tf, 16)
    np.testing.assert_array_equal(train.load(0), score.load(0))
    torch.testing.assert_close(train[0][0], score[0][0])


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    bgr = np.array([[[0, 0, 65535], [0x8080] * 3, [40000] * 3, [0] * 3]], np.uint16)
    rgb = read_rgb(write(tmp_path / "rgb16.png", cv_bytes(".png", bgr)))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0].tolist() == [list(RED), [128] * 3, [156] * 3, [0] * 3]  # 40000 -> 156, not 255

    bgra = np.array([[[0, 0, 65535, 65535], [0, 65535, 0, 0]]], np.uint16)
    rgba = read_rgb(write(tmp_path / "rgba16.png", cv_bytes(".png", bgra)))
    assert rgba[0].tolist() == [list(RED), list(WHITE)]

    grey = pil_bytes(Image.new("I;16", (3, 2), 40000), "PNG")
    assert read_header(grey).mode == "I;16"
    assert (read_rgb(write(tmp_path / "grey16.png", grey)) == 156).all()


def test_palette_png_with_and_without_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([*RED, *GREEN] + [0] * 762)
    im.putpixel((1, 0), 1)
    rgb = read_rgb(write(tmp_path / "p.png", pil_bytes(im, "PNG")))
    assert rgb.shape == (1, 2, 3) and rgb[0].tolist() == [list(RED), list(GREEN)]
    see_through = pil_bytes(im, "PNG", transparency=1)  # the green entry is transparent
    assert read_header(see_through).has_alpha
    rgb = read_rgb(write(tmp_path / "pt.png", see_through))
    assert rgb[0].tolist() == [list(RED), list(WHITE)]


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (48, 16))
    for x, cmyk in enumerate([(0, 255, 255, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        im.paste(cmyk, (16 * x, 0, 16 * x + 16, 16))
    data = pil_bytes(im, "JPEG", quality=95)
    assert read_header(data).mode == "CMYK"
    rgb = read_rgb(write(tmp_path / "cmyk.jpg", data))
    assert rgb.shape == (16, 48, 3)
    for x, expected in [(8, RED), (24, (0, 255, 255)), (40, (0, 0, 0))]:
        np.testing.assert_allclose(rgb[8, x], expected, atol=8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_greyscale_becomes_three_equal_channels(tmp_path, fmt):
    im = Image.new("L", (10, 6), 77)
    rgb = read_rgb(write(tmp_path / "g.img", pil_bytes(im, fmt)))
    assert rgb.shape == (6, 10, 3)
    np.testing.assert_allclose(rgb, 77, atol=2)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_rotated_jpeg_is_shown_upright_at_full_and_reduced_scale(tmp_path):
    # Stored 64 wide x 32 tall, left half red; orientation 6 means "rotate 90 clockwise".
    stored = Image.fromarray(stripes(RED, BLUE, size=32))
    data = pil_bytes(stored, "JPEG", quality=95, exif=_exif(6))
    path = write(tmp_path / "rotated.jpg", data)
    assert read_header(data).orientation == 6
    for min_side, shape in [(None, (64, 32, 3)), (8, (16, 8, 3))]:  # 1/4 scale keeps 8 px
        rgb = read_rgb(path, min_side=min_side)
        assert rgb.shape == shape
        h = rgb.shape[0]
        np.testing.assert_allclose(rgb[h // 8, rgb.shape[1] // 2], RED, atol=12)  # left -> top
        np.testing.assert_allclose(rgb[-h // 8, rgb.shape[1] // 2], BLUE, atol=12)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert raw.shape[:2] == (32, 64)  # what OpenCV's UNCHANGED mode alone would give


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_exif_orientation_matches_pillows_exif_transpose(tmp_path, orientation, fmt):
    # Quadrants of four colours, 2:1, so that every flip and turn gives a different picture.
    top, bottom = stripes(RED, GREEN), stripes(BLUE, WHITE)
    stored = Image.fromarray(np.concatenate([top, bottom]))
    if fmt == "PNG":
        stored = stored.convert("RGBA")  # the alpha path: OpenCV's UNCHANGED mode
    kw = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = pil_bytes(stored, fmt, exif=_exif(orientation), **kw)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    rgb = read_rgb(write(tmp_path / "o.img", data))
    assert rgb.shape == expected.shape
    np.testing.assert_allclose(rgb, expected, atol=12 if fmt == "JPEG" else 0)


def test_webp_lossy_lossless_and_alpha(tmp_path):
    lossy = read_rgb(write(tmp_path / "a.webp", pil_bytes(Image.new("RGB", (37, 21), RED), "WEBP")))
    assert lossy.shape == (21, 37, 3)
    np.testing.assert_allclose(lossy[10, 18], RED, atol=4)
    bgra = np.zeros((21, 37, 4), np.uint8)
    bgra[:, :18] = (255, 0, 0, 255)  # opaque blue on the left, transparent green on the right
    bgra[:, 18:] = (0, 255, 0, 0)
    data = cv_bytes(".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100: lossless
    assert read_header(data).has_alpha
    rgb = read_rgb(write(tmp_path / "b.webp", data))
    assert rgb.shape == (21, 37, 3)
    assert rgb[10, 5].tolist() == list(BLUE) and rgb[10, 30].tolist() == list(WHITE)


def test_bmp_colour_grey_and_alpha(tmp_path):
    colour = read_rgb(write(tmp_path / "c.bmp", cv_bytes(".bmp", stripes(RED, GREEN)[..., ::-1])))
    assert colour.shape == (16, 32, 3)
    assert colour[8, 8].tolist() == list(RED) and colour[8, 24].tolist() == list(GREEN)
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[:, :2] = (0, 0, 255, 255)
    bgra[:, 2:] = (0, 255, 0, 0)
    rgb = read_rgb(write(tmp_path / "a.bmp", cv_bytes(".bmp", bgra)))
    assert rgb[0].tolist() == [list(RED)] * 2 + [list(WHITE)] * 2
    # A 32-bit BMP without an alpha mask: the fourth byte is padding, never transparency.
    padded = read_rgb(
        write(tmp_path / "p.bmp", pil_bytes(Image.new("RGBA", (4, 4), (*RED, 0)), "BMP"))
    )
    assert (padded == RED).all()


@pytest.mark.parametrize(
    ("image", "fmt", "channels"),
    [
        (Image.new("L", (5, 3)), "PNG", 1),
        (Image.new("RGB", (5, 3)), "JPEG", 3),
        (Image.new("RGBA", (5, 3)), "PNG", 4),
        (Image.new("P", (5, 3)), "PNG", 3),
        (Image.new("CMYK", (5, 3)), "JPEG", 4),
        (Image.new("RGBA", (5, 3)), "WEBP", 4),
    ],
)
def test_index_describes_header_facts(tmp_path, image, fmt, channels):
    row = describe_image(write(tmp_path / "x.png", pil_bytes(image, fmt)))
    assert (row["status"], row["width"], row["height"]) == ("ok", 5, 3)
    assert row["channels"] == channels


# ---- limits: refused from the header, before a pixel is decoded -----------------------------


def test_header_gives_the_size_without_pillows_bomb_rule(huge):
    data = huge.read_bytes()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(huge)  # what Pillow's own rule would do, with no size we could report
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        header = read_header(data)
    assert (header.width, header.height, header.mode) == (30000, 30000, "L")
    with pytest.raises(ImageTooLarge, match=HUGE_ERROR) as e:
        decode_rgb(data)
    assert e.value.status == "too_large"


def test_index_quarantines_a_huge_png_among_good_digits(local_storage, cache_dir, huge):
    write_digits(local_storage, per_class=6)
    local_storage.put_source_object("labeled/0/huge.png", huge.read_bytes())
    _, manifest = sync_prefix(local_storage, layout.LABELED, cache_dir)
    df, classes = build_index(manifest, folds=2)
    row = df.set_index("key").loc["labeled/0/huge.png"]
    assert row["status"] == "too_large"
    assert row["error"] == HUGE_ERROR
    assert (row["width"], row["height"], row["split"], row["fold"]) == (30000, 30000, "", -1)
    assert classes == ["0", "1", "2"]
    assert (df.loc[df["key"] != "labeled/0/huge.png", "status"] == "ok").all()


def test_rebuild_index_takes_the_limit_from_the_config(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)  # 32 x 32 = 1024 pixels each
    local_storage.put_source_object("labeled/1/big.png", png_bytes(size=40))
    config = RetrainConfig(
        storage=local_storage.uri,
        cache_dir=str(cache_dir),
        max_image_pixels=1024,
        train=TINY,
    )
    sync_labeled(local_storage, config)
    result = rebuild_index(local_storage, config, "run-1")
    assert result.summary.excluded == {"too_large": 1}
    report = local_storage.read_parquet(result.quarantine)
    assert report["key"].tolist() == ["labeled/1/big.png"]
    assert report["error"].tolist() == ["40x40 = 1,600 pixels exceeds max_image_pixels 1,024"]


def test_reused_rows_are_judged_against_todays_limit(local_storage, cache_dir, monkeypatch):
    write_digits(local_storage, per_class=6)
    local_storage.put_source_object("labeled/1/big.png", png_bytes(size=40))
    _, manifest = sync_prefix(local_storage, layout.LABELED, cache_dir)
    df, classes = build_index(manifest, folds=2)
    assert (df["status"] == "ok").all()
    write_index(local_storage, df, classes)
    described = []
    real = rows_module.describe_image
    monkeypatch.setattr(
        rows_module, "describe_image", lambda p, *a: described.append(p) or real(p, *a)
    )

    lower, _ = build_index(
        manifest, folds=2, previous=read_index(local_storage).rows, max_pixels=1024
    )
    assert described == []  # judged from the stored width and height
    assert lower.set_index("key").loc["labeled/1/big.png", "status"] == "too_large"

    again, _ = build_index(manifest, folds=2, previous=lower)
    assert [p.rsplit("/", 1)[-1] for p in described] == ["big.png"]  # never decoded before
    assert (again["status"] == "ok").all()


def test_corrupt_pixels_stay_unreadable_not_too_large(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100, 100, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"junk" * 10)
    data += _chunk(b"IEND", b"")
    path = write(tmp_path / "corrupt.png", data)
    row = describe_image(path)
    assert row["status"] == "unreadable" and row["width"] == 100
    with pytest.raises(UnreadableImage) as e:
        read_rgb(path)
    assert type(e.value) is UnreadableImage and "corrupt.png" in str(e.value)


def test_training_dataset_refuses_a_huge_image(huge):
    ds = ImageDataset([str(huge)], [0], build_transform(16, MEAN, STD))
    with pytest.raises(ImageTooLarge, match=HUGE_ERROR) as e:
        ds[0]
    assert "huge.png" in str(e.value)
    ds = ImageDataset([str(huge)], [0], build_transform(16, MEAN, STD), max_pixels=10**6)
    with pytest.raises(ImageTooLarge, match="exceeds max_image_pixels 1,000,000"):
        ds[0]


def test_scoring_dataset_and_predict_reject_a_huge_image(tmp_path, huge, tiny_model):
    good = write(tmp_path / "good.png", png_bytes(size=32))
    bad = write(tmp_path / "bad.png", b"not an image")
    paths = [good, str(huge), bad]
    ds = SafeImageDataset(paths, build_transform(32, MEAN, STD), 32)
    image, i, ok = ds[1]
    assert (i, ok) == (1, False) and image.shape == (3, 32, 32)
    assert ds.refusal(1) == ("too_large", HUGE_ERROR)
    assert ds.refusal(2)[0] == "unreadable"

    loaded = LoadedModel("v1", tiny_model[1], tiny_model[0], torch.device("cpu"))
    pred = loaded.predict(paths, batch_size=2)
    assert pred.ok.tolist() == [True, False, False]
    assert pred.status == ["ok", "too_large", "unreadable"]
    assert pred.errors[:2] == ["", HUGE_ERROR] and pred.errors[2]
    probs, ok = loaded.predict_proba(paths)
    assert ok.tolist() == [True, False, False]
    np.testing.assert_allclose(probs, pred.probs, rtol=1e-5)


def test_score_chunk_writes_too_large_rows(local_storage, cache_dir, huge, tiny_model):
    from darkroom.scoring.chunks import read_predictions, score_chunk
    from darkroom.scoring.plan import pending_chunks

    model, meta = tiny_model
    weights = to_bytes(model)
    local_storage.write_bytes("models/v1/model.safetensors", weights)
    local_storage.write_text(
        "models/v1/model.json", json.dumps({**meta, "version": "v1", "sha256": sha256(weights)})
    )
    write_digits(local_storage, classes=("0",), per_class=1, incoming=2)
    local_storage.put_source_object("incoming/huge.png", huge.read_bytes())
    local_storage.put_source_object("incoming/broken.png", b"not a png")
    config = ScoreConfig(storage=local_storage.uri, cache_dir=str(cache_dir), device="cpu")
    for chunk in pending_chunks(local_storage, "v1", 10).chunks:
        score_chunk(local_storage, config, "v1", chunk)
    rows = read_predictions(local_storage, "v1").set_index("key")
    assert rows.loc["incoming/huge.png", "status"] == "too_large"
    assert rows.loc["incoming/huge.png", "error"] == HUGE_ERROR
    assert rows.loc["incoming/broken.png", "status"] == "unreadable"
    assert (rows.drop(["incoming/huge.png", "incoming/broken.png"])["status"] == "ok").all()


# ---- large but allowed: JPEGs decoded at reduced scale ---------------------------------------


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 6000 x 4000 (24 MP) JPEG: red left half, blue right half."""
    img = np.zeros((4000, 6000, 3), np.uint8)
    img[:, :3000] = RED[::-1]
    img[:, 3000:] = BLUE[::-1]
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    path.write_bytes(cv_bytes(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90]))
    return str(path)


def test_large_jpeg_is_decoded_at_reduced_scale(photo):
    assert read_rgb(photo, min_side=224).shape == (500, 750, 3)  # 1/8: 500 >= 224
    assert read_rgb(photo, min_side=600).shape == (1000, 1500, 3)  # 1/4: 1/8 would be 500
    rgb = read_rgb(photo, min_side=224)
    np.testing.assert_allclose(rgb[250, 100], RED, atol=6)
    np.testing.assert_allclose(rgb[250, 650], BLUE, atol=6)

    # Built as the training loader builds it: the target size comes from the transform.
    ds = ImageDataset([photo], [0], build_transform(224, MEAN, STD, "soft"))
    assert ds.min_side == 224
    assert ds.load(0).shape == (500, 750, 3)
    assert ds[0][0].shape == (3, 224, 224)
    scoring = SafeImageDataset([photo], build_transform(224, MEAN, STD), 224)
    assert scoring.load(0).shape == (500, 750, 3)
    assert scoring[0][0].shape == (3, 224, 224) and scoring[0][2] is True


def _png(mode: str, **save) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 4), np.uint8)
    image = Image.fromarray(pixels[..., : Image.getmodebands(mode)].squeeze(), mode)
    out = io.BytesIO()
    image.save(out, "PNG", **save)
    return out.getvalue()


FAST_PNGS = {
    "grey": lambda: _png("L"),
    "rgb": lambda: _png("RGB"),
    "rgba": lambda: _png("RGBA"),
    "grey alpha": lambda: _png("LA"),
    "rgb, one colour transparent": lambda: _png("RGB", transparency=(0, 0, 0)),
    "grey, one level transparent": lambda: _png("L", transparency=0),
    "with text chunks": lambda: _png("RGB", pnginfo=_text_chunks()),
}


def _text_chunks():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "darkroom test")
    return info


@pytest.mark.parametrize("name", sorted(FAST_PNGS))
def test_png_header_read_directly_is_pillows(name):
    # The common PNGs' header is read without Pillow (scoring reads one per image): it must say
    # what Pillow says, transparency chunks included.
    data = FAST_PNGS[name]()
    assert _png_header(data) is not None, "this PNG should take the direct path"
    assert read_header(data) == pillow_header(data)


@pytest.mark.parametrize(
    "case", [c for c in BATTERY if c.make()[:4] == b"\x89PNG"], ids=lambda c: c.path
)
def test_every_png_of_the_battery_gets_pillows_header_or_its_error(case):
    data = case.make()
    try:
        expected = pillow_header(data)
    except UnreadableImage:
        expected = None
    if expected is None:  # Pillow refuses it: the direct path must not accept it either...
        with pytest.raises(UnreadableImage):
            decode_rgb(data)  # ...or OpenCV refuses the pixels
    else:
        assert read_header(data) == expected
