"""A battery of hostile image files, and what darkroom must make of each.

Each ``Case`` is one file: where it goes (``<class>/<name>``, under ``labeled/`` and again
under ``incoming/``), a factory for its bytes, and the expected outcome: the index status
(``ok`` or the reason it is quarantined) with a fragment of the report's error, and the
status/error fragment of its prediction row when the same bytes arrive to be scored.

The usable files are real digits (scikit-learn's) in unusual encodings, so that they are
fair training data of their class. The pixel bomb is written a scanline at a time: its 900
million pixels are never held in memory, here or (if darkroom is right) anywhere else.
"""

from __future__ import annotations

import io
import struct
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

BOMB_SIDE = 30000
LIMIT = "max_image_pixels"
BYTE_STATUSES = ("ok", "unreadable", "too_large")
NOT_AN_IMAGE = "not a readable JPEG, PNG, WebP or BMP header"
UNSAFE = "must be a relative POSIX path"


@dataclass(frozen=True)
class Case:
    """One hostile file and what must come of it.

    Attributes:
        path: ``<class>/<name>`` (or a bare name: no class folder) below labeled/ and incoming/.
        make: its bytes.
        status: its index status under labeled/ ("ok", or why it is quarantined).
        reason: a fragment of the quarantine report's error ("" when ok).
        label: the label an ok row must carry (default: the class folder).
        score: its prediction status under incoming/.
        score_error: a fragment of that row's error ("" when scored).
    """

    path: str
    make: Callable[[], bytes]
    status: str = "ok"
    reason: str = ""
    label: str | None = None
    score: str = "ok"
    score_error: str = ""

    @property
    def expected_label(self) -> str:
        return self.label or self.path.split("/")[0]

    @property
    def bytes_status(self) -> str:
        """What the bytes alone make of it (a duplicate or an unsafe key is a fine image)."""
        return self.status if self.status in BYTE_STATUSES else "ok"


# ---- the bytes -------------------------------------------------------------------------------


@cache
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit(label: str, nth: int, size: int = 32) -> np.ndarray:
    """The ``nth`` digit ``label`` counted from the middle of the set (the tests' plain
    digits come from both ends), as a size x size grey image."""
    d = _digits()
    i = [j for j in range(600, len(d.target)) if str(d.target[j]) == label][nth]
    img = (d.data[i].reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)


def _pil(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A black grey PNG of side x side pixels, compressed one scanline at a time (under
    1 MB, and one row of memory to write; decoding it would need side squared bytes)."""
    z, row = zlib.compressobj(9), bytes(side + 1)  # filter byte 0, then black pixels
    parts = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)),
    ]
    for _ in range(side):
        if data := z.compress(row):
            parts.append(_chunk(b"IDAT", data))
    parts += [_chunk(b"IDAT", z.flush()), _chunk(b"IEND", b"")]
    return b"".join(parts)


def jpeg_bomb() -> bytes:
    """A real 32 x 32 JPEG whose frame header claims 60000 x 60000 pixels."""
    data = bytearray(_pil(Image.fromarray(digit("2", 6)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # SOF0: length, precision, then height and width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def webp_bomb() -> bytes:
    """A WebP header alone, for a 16384 x 16384 canvas (Pillow would allocate it to open it)."""
    side = (16384 - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + side + side
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def cmyk_jpeg() -> bytes:
    return _pil(Image.fromarray(digit("0", 0)).convert("CMYK"), "JPEG", quality=95)


def grey16_png() -> bytes:
    return _png(digit("1", 0).astype(np.uint16) * 257)


def rgba_png() -> bytes:
    rgba = cv2.cvtColor(digit("2", 0), cv2.COLOR_GRAY2BGRA)
    rgba[:2, :, 3] = 0  # a see-through top edge: composited, not dropped
    return _png(rgba)


def palette_png() -> bytes:
    im = Image.fromarray(digit("0", 1)).convert("RGB").quantize(16)
    return _pil(im, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    """Stored turned a quarter left, with EXIF orientation 6 (turn right to show)."""
    stored = Image.fromarray(np.rot90(digit("1", 1)).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    return _pil(stored, "JPEG", quality=95, exif=exif)


def progressive_jpeg() -> bytes:
    return _pil(Image.fromarray(digit("2", 7)), "JPEG", quality=90, progressive=True)


def grey_alpha_png() -> bytes:
    im = Image.fromarray(np.dstack([digit("0", 7), np.full((32, 32), 200, np.uint8)]), "LA")
    return _pil(im, "PNG")


def lossy_webp() -> bytes:
    return _pil(Image.fromarray(digit("2", 1)).convert("RGB"), "WEBP", quality=90)


def lossless_alpha_webp() -> bytes:
    grey = digit("0", 2)
    alpha = np.full_like(grey, 255)
    alpha[:2] = 0  # a see-through top edge, as in rgba_png
    return _pil(
        Image.fromarray(np.dstack([grey, grey, grey, alpha]), "RGBA"), "WEBP", lossless=True
    )


def bmp() -> bytes:
    return _pil(Image.fromarray(digit("1", 2)).convert("RGB"), "BMP")


def unicode_png() -> bytes:
    return _png(digit("2", 2))


def nfd_png() -> bytes:
    return _png(digit("1", 6))


def url_hostile_png() -> bytes:
    return _png(digit("1", 7))


def png_as_jpg() -> bytes:
    return _png(digit("0", 3))


def backslashed() -> bytes:
    return _png(digit("0", 6))


def truncated_png() -> bytes:
    data = _png(digit("1", 3))
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = _pil(Image.fromarray(digit("2", 3)), "JPEG", quality=95)
    return data[: len(data) // 2]


def gif_as_png() -> bytes:
    return _pil(Image.fromarray(digit("0", 4)), "GIF")


def random_bytes() -> bytes:
    return np.random.default_rng(10).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def corrupt_pixels_png() -> bytes:
    """A valid header (100 x 100 RGB) over compressed data that is not."""
    ihdr = struct.pack(">IIBBBBB", 100, 100, 8, 2, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"junk" * 10) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def twin() -> bytes:
    return _png(digit("1", 4))


def copy() -> bytes:
    return _png(digit("2", 4))


def relabelled() -> bytes:
    return _png(digit("1", 5))


def loose() -> bytes:
    return _png(digit("2", 5))


def orphan() -> bytes:
    return _png(digit("0", 5))


# ---- the battery -----------------------------------------------------------------------------


def unreadable(path: str, make: Callable[[], bytes], reason: str, score_error: str = "") -> Case:
    """Bytes no decoder takes: quarantined and rejected, with the same reason by default."""
    return Case(path, make, "unreadable", reason, None, "unreadable", score_error or reason)


def too_large(path: str, make: Callable[[], bytes]) -> Case:
    """More pixels than the limit, by the header: quarantined and rejected, never decoded."""
    return Case(path, make, "too_large", LIMIT, None, "too_large", LIMIT)


DECODE = "could not decode"
BATTERY: list[Case] = [
    # Unusual but fine: decoded as a viewer shows them, trained on and scored.
    Case("0/cmyk.jpg", cmyk_jpeg),
    Case("1/deep 16-bit.png", grey16_png),
    Case("2/rgba.png", rgba_png),
    Case("0/palette.png", palette_png),
    Case("1/exif-rotated.jpg", exif_rotated_jpeg),
    Case("2/lossy.webp", lossy_webp),
    Case("0/lossless alpha.webp", lossless_alpha_webp),
    Case("1/windows.bmp", bmp),
    Case("2/progressive.jpg", progressive_jpeg),
    Case("0/grey alpha.png", grey_alpha_png),
    Case("2/ünïcødé ñame+1.png", unicode_png),
    # The same name decomposed (as macOS spells it): another key, another object.
    Case(unicodedata.normalize("NFD", "1/ünïcødé ñame+1.png"), nfd_png),
    Case("1/100% sure?#&=.png", url_hostile_png),  # characters that URLs escape
    Case("0/a png named.jpg", png_as_jpg),  # the bytes decide, not the extension
    # Unusable: quarantined with the reason, rejected by scoring with the reason.
    unreadable("0/empty.png", bytes, NOT_AN_IMAGE, "empty file"),
    unreadable("1/truncated.png", truncated_png, DECODE),
    unreadable("2/truncated.jpg", truncated_jpeg, DECODE),
    unreadable("0/random.jpg", random_bytes, NOT_AN_IMAGE),
    unreadable("1/a gif named.png", gif_as_png, NOT_AN_IMAGE),
    unreadable("2/corrupt pixels.png", corrupt_pixels_png, DECODE),
    too_large("1/bomb.png", bomb_png),
    too_large("2/bomb.jpg", jpeg_bomb),
    too_large("0/bomb.webp", webp_bomb),
    # A key that could escape the cache: refused by name, its bytes never fetched.
    Case("0/back\\slash.png", backslashed, "unsafe_key", UNSAFE, None, "unreadable", "not a safe"),
    # Label trouble: fine bytes, so scored, but not trained on.
    Case("0/twin.png", twin, "conflicting_labels", "different labels"),
    Case("1/twin.png", twin, "conflicting_labels", "different labels"),
    Case("2/copy a.png", copy),
    Case("2/copy b.png", copy, "duplicate", "same content as labeled/2/copy a.png"),
    Case("1/relabelled.png", relabelled, "conflicting_label_file", "different labels ('1', '2')"),
    Case("loose.png", loose, label="2"),  # no class folder: labels.csv names it
    Case("orphan.png", orphan, "unlabeled", "no class folder and no entry in labels file"),
]

# labels.csv: one key given two labels, one key with no object, one key it labels.
LABELS_CSV = (
    "key,label\n"
    "labeled/1/relabelled.png,1\n"
    "1/relabelled.png,2\n"  # the same key without the prefix: still the same key
    "labeled/0/ghost.png,0\n"
    "loose.png,2\n"
)
MISSING = {"labeled/0/ghost.png": ("missing_object", "no such object under labeled/")}
