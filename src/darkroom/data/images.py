"""Images to tensors: the header checked before any pixel is decoded, OpenCV decode to 8-bit RGB
as a viewer shows it, albumentations transforms.

Every path that reads an image (index check, training, evaluation, scoring) goes through
``decode_rgb``, so all of them see the same pixels and refuse the same files.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from darkroom.config import RuntimeConfig
from darkroom.data.headers import (  # noqa: F401  (the image errors and header, imported from here too)
    ImageHeader,
    ImageTooLarge,
    UnreadableImage,
    check_pixels,
    read_header,
)

# The config's default is the one source of the limit (Pillow's decompression-bomb error size).
DEFAULT_MAX_IMAGE_PIXELS: int = RuntimeConfig.model_fields["max_image_pixels"].default
# Transparent pixels become white. Most transparent images (product shots, logos, icons,
# drawings) are made to sit on a white page, and the JPEG copies of such images that arrive
# beside them were flattened on white by the tools that exported them: white keeps both alike.
# Black would turn a dark logo with a transparent surround into a black square.
BACKGROUND = (255, 255, 255)
_BG = np.array(BACKGROUND, np.uint16)
_BAND_PIXELS = 1 << 20  # pixels converted at a time: temporaries stay tens of MB at any size
# EXIF orientation 2..8 -> what turns the stored pixels into what a viewer shows (1: as stored).
_ORIENT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def _imdecode(data: bytes, flags: int) -> np.ndarray:
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:  # OpenCV raises on some malformed files instead of returning None
        img = None
    if img is None:
        raise UnreadableImage("OpenCV could not decode the image")
    return img


def check_decodable(data: bytes, header: ImageHeader) -> None:
    """Raises UnreadableImage unless OpenCV decodes ``data``, in grey: a JPEG at 1/8 scale (a
    64th of its pixels' memory), other formats at one byte a pixel (OpenCV would decode them
    whole before reducing them anyway)."""
    jpeg = header.format == "JPEG"
    flags = cv2.IMREAD_REDUCED_GRAYSCALE_8 if jpeg else cv2.IMREAD_GRAYSCALE
    _imdecode(data, flags | cv2.IMREAD_IGNORE_ORIENTATION)


def _jpeg_flags(header: ImageHeader, min_side: int | None) -> int:
    """The largest libjpeg scale (1/2, 1/4, 1/8: DCT scaling, cheap in time and memory) that
    keeps the shorter side at least ``min_side``; EXIF orientation is applied afterwards."""
    short = min(header.width, header.height)
    factor = next((f for f in (8, 4, 2) if min_side and -(-short // f) >= min_side), 1)
    return _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION


def _to_rgb8(img: np.ndarray, has_alpha: bool) -> np.ndarray:
    """OpenCV's array (grey, BGR or BGRA; 8 or 16 bits) as 8-bit RGB, alpha composited on
    BACKGROUND, a band of rows at a time so that no temporary is the whole image's size."""
    img = img[..., None] if img.ndim == 2 else img
    if img.dtype not in (np.uint8, np.uint16):
        raise UnreadableImage(f"unsupported sample type {img.dtype}")
    channels = img.shape[2]
    alpha = has_alpha and channels in (2, 4)
    if img.dtype == np.uint8 and channels == 3:  # JPEG, RGB PNG: in place, no copy
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)
    if img.dtype == np.uint8 and channels == 1:  # 8-bit grey: OpenCV's own loop
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    out = np.empty((*img.shape[:2], 3), np.uint8)
    rows = max(1, _BAND_PIXELS // img.shape[1])
    for y in range(0, img.shape[0], rows):
        band = img[y : y + rows].astype(np.uint32)
        if img.dtype == np.uint16:  # 65535 -> 255, rounded: scaled, never clipped
            band = (band * 255 + 32767) // 65535
        colour = band[..., :1] if channels < 3 else band[..., 2::-1]
        if alpha:
            a = band[..., -1:]
            colour = (colour * a + _BG * (255 - a) + 127) // 255
        out[y : y + rows] = colour
    return out


def decode_rgb(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int | None = None
) -> np.ndarray:
    """Decodes image bytes to an HxWx3 uint8 RGB array, as a viewer shows the image.

    The header is read first, and an image over ``max_pixels`` is refused before a pixel is
    decoded. Alpha is composited on BACKGROUND, 16-bit samples are scaled to 8 bits, palette,
    grey and CMYK become RGB, and the EXIF orientation is applied (OpenCV is told to ignore
    it and this function applies it, the same way for every format and decode mode).

    Args:
        max_pixels: the most pixels (width x height, from the header) an image may have.
        min_side: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when its shorter side stays at
            least this long; None: full scale.

    Raises:
        ImageTooLarge: more pixels than ``max_pixels``.
        UnreadableImage: not an image OpenCV can decode.
    """
    if not data:
        raise UnreadableImage("empty file")
    header = read_header(data)
    check_pixels(header.width, header.height, max_pixels)
    jpeg = header.format == "JPEG"  # no alpha, 8 bits: OpenCV's colour mode handles CMYK too
    flags = _jpeg_flags(header, min_side) if jpeg else cv2.IMREAD_UNCHANGED
    rgb = _to_rgb8(_imdecode(data, flags), header.has_alpha)
    return _ORIENT[header.orientation](rgb) if header.orientation in _ORIENT else rgb


def read_rgb(
    path: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int | None = None
) -> np.ndarray:
    """``decode_rgb`` of a file; errors name the file."""
    try:
        if not path:
            raise UnreadableImage("no local copy of the image")
        with open(path, "rb") as f:  # not a Path per image: scoring reads thousands a second
            data = f.read()
        return decode_rgb(data, max_pixels=max_pixels, min_side=min_side)
    except OSError as e:
        raise UnreadableImage(f"could not read the file: {e.strerror}", str(path)) from e
    except UnreadableImage as e:
        e.path = str(path) if path else None
        raise


def build_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: str = "none"
) -> A.Compose:
    """Resize (+ augmentation for training), normalise with the backbone's mean/std, to tensor.

    Args:
        augment: "soft" (the tutorials' rotate/flip/one hole), "no-flip" (the same without
            mirroring, for text and digits) or "none" (evaluation).
    """
    ops: list = [A.Resize(image_size, image_size), *_augment_ops(image_size, augment)]
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


def augmentation(image_size: int, augment: str) -> A.Compose:
    """``build_transform``'s steps between its Resize and its Normalize: what runs on pixels
    that are ``image_size`` square already (the decode-once cache), uint8 in and out."""
    return A.Compose(_augment_ops(image_size, augment))


def _augment_ops(image_size: int, augment: str) -> list:
    if augment == "none":
        return []
    if augment not in ("soft", "no-flip"):
        raise ValueError(f"unknown augment {augment!r}: use soft, no-flip or none")
    ops: list = [A.Rotate(limit=45, p=0.6)]
    if augment == "soft":
        ops.append(A.HorizontalFlip(p=0.6))
    hole = max(1, round(64 * image_size / 224))  # one 64 px hole at 224 px, scaled
    ops.append(
        A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(hole, hole),
            hole_width_range=(hole, hole),
            p=0.3,
        )
    )
    return ops


def uint8_affine(
    mean: Sequence[float], std: Sequence[float], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """255 mean and 1 / (255 std) as NCHW-broadcastable tensors on ``device``: with them,
    ``normalise_uint8`` is albumentations' Normalize, ``(x - 255 mean) * (1 / (255 std))`` in
    float32."""
    shift = np.asarray(mean, np.float32) * np.float32(255)
    scale = np.reciprocal(np.asarray(std, np.float32) * np.float32(255))
    return tuple(torch.from_numpy(v).view(1, -1, 1, 1).to(device) for v in (shift, scale))


def normalise_uint8(images: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]):
    """NHWC uint8 pixels as a model's input: NCHW float32 (channels-last memory; the permute
    moves no data), the same to the bit as ``build_transform``'s Normalize + ToTensorV2."""
    shift, scale = affine
    return images.permute(0, 3, 1, 2).float().sub_(shift).mul_(scale)


def _leading_resize(transform) -> int | None:
    """The side a transform that starts with a Resize makes: decoding more is wasted."""
    first = next(iter(getattr(transform, "transforms", ())), None)
    return max(first.height, first.width) if isinstance(first, A.Resize) else None


class ImageDataset(Dataset):
    """Files and integer labels (-1 when unlabeled) through a transform.

    Args:
        max_pixels: images with more pixels are refused from their header (ImageTooLarge).
        min_side: the shorter side a JPEG keeps when decoded at reduced scale; None: the
            size of the transform's leading Resize, if it has one (else full scale).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | None,
        transform,
        *,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        min_side: int | None = None,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = _leading_resize(transform) if min_side is None else min_side

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """Item ``i``'s RGB pixels before the transform."""
        return read_rgb(self.paths[i], max_pixels=self.max_pixels, min_side=self.min_side)

    def __getitem__(self, i: int):
        image = self.transform(image=self.load(i))["image"]
        return image, torch.tensor(self.labels[i], dtype=torch.long)


class SafeImageDataset(ImageDataset):
    """For scoring: an unusable file yields a zero image and ok=False instead of raising."""

    def __init__(
        self, paths, transform, image_size: int, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ):
        super().__init__(paths, None, transform, max_pixels=max_pixels, min_side=image_size)
        self.blank = torch.zeros(3, image_size, image_size)

    def __getitem__(self, i: int):
        try:
            return super().__getitem__(i)[0], i, True
        except UnreadableImage:
            return self.blank, i, False

    def refusal(self, i: int) -> tuple[str, str]:
        """Why item ``i`` came back not ok, as (status, reason). Found again in the calling
        process: a loader worker returns only the flag. Cheap for a file refused by its
        header; a file that fails to decode is tried again."""
        try:
            self.load(i)
        except UnreadableImage as e:
            return e.status, e.reason
        return "unreadable", "could not be decoded in a loader worker"


def worker_context(num_workers: int) -> str | None:
    """DataLoader workers start from a clean forkserver, not a fork of this process: a Prefect
    worker is multithreaded (engine, log and event threads), and forking it is unsafe."""
    return "forkserver" if num_workers > 0 else None
