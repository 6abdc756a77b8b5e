"""Which storage keys are images: the ones darkroom reads, and the formats it refuses (named,
never skipped in silence)."""

from __future__ import annotations

import logging

from darkroom.storage import printable_key

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Images darkroom does not read: refused and reported (never skipped in silence).
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2",
    ".j2k", ".svg", ".ico", ".psd", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2")  # fmt: skip


class UnsupportedFormat(ValueError):
    """An image file in a format darkroom does not read (judged by its name)."""

    status = "unsupported_format"

    def __init__(self, key: str):
        super().__init__(
            f"'{printable_key(key)}' is an image format darkroom does not read: convert it to "
            f"one of {', '.join(IMAGE_EXTENSIONS)}"
        )


def is_image_key(key: str) -> bool:
    """Whether ``key`` names an image darkroom can use. A file name that is not UTF-8 is
    not one: it is skipped with a warning, so no planner hashes or reports it as text."""
    if not key.lower().endswith(IMAGE_EXTENSIONS):
        return False
    if not key.isascii() and printable_key(key) != key:
        log.warning("skipped '%s': the file name is not valid UTF-8: rename it", printable_key(key))
        return False
    return True


def is_unsupported_image(key: str) -> bool:
    """Whether ``key`` names an image in a format darkroom does not read (.gif, .heic...)."""
    return key.lower().endswith(UNSUPPORTED_IMAGE_EXTENSIONS)


def names_an_image(key: str) -> bool:
    """Whether ``key`` is one a user put in as an image: one darkroom reads, or one in a
    format it refuses (which then gets a row saying so, never a silent skip)."""
    return is_unsupported_image(key) or is_image_key(key)
