"""What an image file's header says (size, mode, alpha, EXIF orientation), read without
decoding a pixel, and the errors of an image that cannot be used: the checks every path runs
before it decodes (``darkroom.data.decode_rgb``)."""

from __future__ import annotations

import io
from dataclasses import dataclass

# Importing the plugins registers them in Image.OPEN, which read_header calls directly.
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin  # noqa: F401

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
ORIENTATIONS = range(1, 9)  # EXIF's: 1 shows as stored, 2..8 flip and/or rotate


class UnreadableImage(ValueError):
    """An image that cannot be used. ``status`` names the kind (the index and prediction
    status), ``reason`` says why without the local path, which ``str()`` adds when known."""

    status = "unreadable"

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason)
        self.reason, self.path = reason, path

    def __str__(self) -> str:
        return f"{self.reason} ({self.path})" if self.path else self.reason


class ImageTooLarge(UnreadableImage):
    """More pixels than the configured limit, known from the header: nothing was decoded."""

    status = "too_large"


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding a pixel."""

    width: int
    height: int
    mode: str  # Pillow's mode: L, LA, P, RGB, RGBA, CMYK, I;16...
    format: str  # JPEG, PNG, WEBP or BMP
    has_alpha: bool
    orientation: int = 1  # EXIF orientation; 1: show as stored

    @property
    def channels(self) -> int:
        """Channels as stored; a palette counts as RGB, or RGBA when it has transparency."""
        if self.mode in ("P", "PA"):
            return 4 if self.has_alpha else 3
        return Image.getmodebands(self.mode)


def _orientation(exif: bytes | None) -> int:
    if not exif:
        return 1
    try:
        tags = Image.Exif()
        tags.load(exif)
        value = int(tags.get(0x0112, 1))
    except Exception:  # a broken EXIF block only loses the orientation, never the image
        return 1
    return value if value in ORIENTATIONS else 1


def _riff_chunk(data: bytes, fourcc: bytes) -> bytes | None:
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == fourcc:
            return data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)
    return None


def _webp_header(data: bytes) -> ImageHeader:
    """WebP's header parsed here: Pillow's WebP plugin allocates the whole canvas to open a
    file, which is what a header check must not do."""
    kind, alpha, orientation = data[12:16], False, 1
    if kind == b"VP8X" and len(data) >= 30:
        flags = data[20]
        w, h = (int.from_bytes(data[i : i + 3], "little") + 1 for i in (24, 27))
        alpha = bool(flags & 0x10)
        if flags & 0x08:
            orientation = _orientation(_riff_chunk(data, b"EXIF"))
    elif kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        w, h, alpha = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    elif kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = (int.from_bytes(data[i : i + 2], "little") & 0x3FFF for i in (26, 28))
    else:
        raise UnreadableImage("not a readable WebP header")
    return ImageHeader(w, h, "RGBA" if alpha else "RGB", "WEBP", alpha, orientation)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 8-bit PNG colour types read here, as Pillow names their mode; the rest go through Pillow.
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}


def _png_header(data: bytes) -> ImageHeader | None:
    """The common PNGs' header read from IHDR and the chunks before the pixels, several times
    faster than opening them with Pillow (scoring reads one per image); None for the rarer
    kinds (palette, not 8 bits, EXIF, anything odd), which Pillow reads."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    mode = _PNG_MODES.get(colour) if depth == 8 else None
    if mode is None or not width or not height:
        return None
    alpha, pos = colour in (4, 6), 33
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            return ImageHeader(width, height, mode, "PNG", alpha)
        if kind == b"eXIf":
            return None  # an orientation to read: Pillow's way
        alpha |= kind == b"tRNS"
        pos += 12 + size
    return None  # no pixel data: let Pillow say what is wrong


def read_header(data: bytes) -> ImageHeader:
    """The size, mode and orientation of JPEG, PNG, WebP or BMP bytes; no pixel is decoded.

    Pillow's format plugins are called directly: ``Image.open`` would first apply Pillow's own
    decompression-bomb rule (a process-wide setting), and ours must be the one that rules.

    Raises:
        UnreadableImage: none of those formats, or a header that does not parse.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_header(data)
    return _png_header(data) or pillow_header(data)


def pillow_header(data: bytes) -> ImageHeader:
    """``read_header`` by Pillow's JPEG, PNG and BMP plugins alone."""
    for fmt in ("JPEG", "PNG", "BMP"):
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            im = factory(io.BytesIO(data), "")
        except Exception:  # hostile bytes: any parse failure just means unreadable
            continue
        has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
        fmt = "JPEG" if im.format == "MPO" else im.format  # a camera's multi-picture JPEG
        return ImageHeader(*im.size, im.mode, fmt, has_alpha, _orientation(im.info.get("exif")))
    raise UnreadableImage("not a readable JPEG, PNG, WebP or BMP header")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raises ImageTooLarge when ``width x height`` exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels exceeds max_image_pixels {max_pixels:,}"
        )
