"""One storage interface with two backends: a local folder and S3 (boto3).

A storage root is a URI: ``file:///abs/path``, ``file://./relative`` or ``s3://bucket/prefix``.
Keys are POSIX paths relative to the root (``labeled/cat/1.jpg``). Nothing else in darkroom
touches boto3 or the folder layout. The interface is in ``base``, the backends in ``local``
and ``s3`` (boto3 is imported only where S3 is used), the one-run-per-root lease in ``lease``.
"""

from __future__ import annotations

from urllib.parse import urlparse

from darkroom.storage.base import (
    DEFAULT_STORAGE,
    PARQUET_META,
    READ_ONLY_PREFIXES,
    BadKeyName,
    ObjectInfo,
    PreconditionFailed,
    Storage,
    StorageError,
    StorageSetupError,
    UnsafeKeyError,
    atomic_write_file,
    check_key,
    default_storage_uri,
    printable_key,
)
from darkroom.storage.local import LocalStorage

__all__ = [
    "DEFAULT_STORAGE",
    "PARQUET_META",
    "READ_ONLY_PREFIXES",
    "BadKeyName",
    "LocalStorage",
    "ObjectInfo",
    "PreconditionFailed",
    "Storage",
    "StorageError",
    "StorageSetupError",
    "UnsafeKeyError",
    "atomic_write_file",
    "check_key",
    "default_storage_uri",
    "open_storage",
    "printable_key",
]


def open_storage(uri: str | None = None) -> Storage:
    """Opens a storage root from a URI (default: ``$DARKROOM_STORAGE`` or ./data/bucket)."""
    uri = uri or default_storage_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        # file://./rel and file:///abs are both accepted; netloc carries the "." of ./rel.
        host = "" if parsed.netloc == "localhost" else parsed.netloc
        path = host + parsed.path
        return LocalStorage(path or ".")
    if parsed.scheme == "s3":
        if len(parsed.netloc) < 3:
            raise StorageSetupError(f"bad S3 URI {uri!r}: expected s3://bucket[/prefix]")
        from darkroom.storage.s3 import S3Storage

        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme == "" and uri:
        return LocalStorage(uri)
    raise StorageSetupError(
        f"unsupported storage URI {uri!r}: use file://PATH or s3://BUCKET/PREFIX"
    )
