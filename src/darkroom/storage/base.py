"""The storage interface every backend implements, its errors and key rules, and atomic file writes.

A storage root is a URI: ``file:///abs/path``, ``file://./relative`` or ``s3://bucket/prefix``.
Keys are POSIX paths relative to the root (``labeled/cat/1.jpg``). Nothing else in darkroom
touches boto3 or the folder layout.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from darkroom import layout

DEFAULT_STORAGE = "file://./data/bucket"

# darkroom reads these prefixes and never writes, moves or deletes anything under them.
READ_ONLY_PREFIXES = (layout.LABELED, layout.INCOMING)
PARQUET_META = b"darkroom"  # where write_parquet keeps its ``meta`` in the file's schema


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must fix (bad URI, missing bucket...)."""


class StorageSetupError(StorageError):
    """Storage that no retry can fix: credentials, permissions, a missing bucket or root, a bad
    URI. The message says what to set or create."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed since it was read."""


class UnsafeKeyError(ValueError):
    """A key that would escape the cache or storage root."""

    status = "unsafe_key"  # what a report of the refused object says


class BadKeyName(UnsafeKeyError):
    """A local file name that is not valid UTF-8. No storage key, report row or chunk id can
    spell it, so the file is refused until it is renamed."""

    status = "bad_name"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def default_storage_uri() -> str:
    return os.environ.get("DARKROOM_STORAGE", DEFAULT_STORAGE)


def printable_key(key: str) -> str:
    """``key`` as valid text for logs and reports: bytes of a file name that are not UTF-8
    (decoded by the OS as surrogate escapes) are shown as ``\\xff``."""
    try:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return key.encode("utf-8", "backslashreplace").decode("utf-8")


def check_key(key: str) -> str:
    """Returns ``key`` if it is a safe relative POSIX path of valid UTF-8.

    Raises:
        BadKeyName: the key holds bytes that are not UTF-8 (a local file name).
        UnsafeKeyError: the key could escape the root (absolute, ``..``, backslash...).
    """
    if key and not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise BadKeyName(
                f"file name '{printable_key(key)}' is not valid UTF-8: rename it"
            ) from None
    if not key or "\\" in key or "\x00" in key or key.startswith("/"):
        raise UnsafeKeyError(f"unsafe key {key!r}: must be a relative POSIX path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise UnsafeKeyError(f"unsafe key {key!r}: empty, '.' or '..' segments are not allowed")
    return key


def _check_writable(key: str) -> None:
    check_key(key)
    if key.startswith(READ_ONLY_PREFIXES):
        raise PermissionError(f"darkroom never writes under {READ_ONLY_PREFIXES}: refused {key!r}")


def _check_deletable(key: str) -> str:
    """``key`` if darkroom may delete it: never a user's image, nor a labels file."""
    _check_writable(key)
    if key in layout.LABEL_FILES:
        raise PermissionError(f"darkroom never deletes the labels file {key!r}")
    return key


class Storage:
    """Interface shared by the backends. ``uri`` identifies the root."""

    uri: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def check(self) -> None:
        """Fails fast, with what to fix, when the root cannot be read (missing root or bucket,
        no credentials, access denied).

        Raises:
            StorageSetupError: the root is unusable as configured.
        """
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Writes ``data`` atomically and returns the new etag. Refuses the user's sources.

        Args:
            if_match: only write if the current object's etag equals this.
            if_none_match: only write if no object exists at ``key``.

        Raises:
            PreconditionFailed: the condition did not hold; nothing was written.
        """
        _check_writable(key)
        return self._put(key, data, if_match, if_none_match)

    def delete(self, key: str) -> None:
        """Removes one of darkroom's own objects (never a user's source); absent is fine."""
        _check_writable(key)
        self._delete(key)

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_many(self, keys: Iterable[str]) -> dict[str, str]:
        """Removes many of darkroom's own objects (absent ones are fine) and returns those it
        could not remove, with why. Every key is checked before any is removed.

        Raises:
            PermissionError: a key is a user's image (labeled/, incoming/) or a labels file;
                nothing was removed.
        """
        return self._delete_many([_check_deletable(k) for k in keys])

    def _delete_many(self, keys: list[str]) -> dict[str, str]:
        """One delete per key; a backend with batched deletes does better."""
        failed = {}
        for key in keys:
            try:
                self._delete(key)
            except OSError as e:
                failed[key] = str(e)
        return failed

    def put_source_object(self, key: str, data: bytes) -> str:
        """Adds a user image under labeled/ or incoming/: for the demo data and tests only.
        Never overwrites: an existing object is left as it is."""
        try:
            return self._put(check_key(key), data, None, True)
        except PreconditionFailed:
            return self.etag(key)

    def _put(self, key: str, data: bytes, if_match: str | None, if_none_match: bool) -> str:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def etag(self, key: str) -> str | None:
        """The current etag of ``key``, or None when absent."""
        raise NotImplementedError

    def download(self, key: str, dest: Path, expected: ObjectInfo | None = None) -> None:
        """Copies ``key`` to ``dest`` atomically (temp file, then rename); ``expected``, the
        listing's entry, lets a backend check that it got that very version."""
        atomic_write_file(dest, self.read_bytes(key))

    def for_threads(self, threads: int) -> Storage:
        """This root, able to serve ``threads`` requests at once (S3: a pool that large)."""
        return self

    def local_path(self, key: str) -> Path | None:
        """A path to read ``key`` in place, when the backend is a local folder."""
        return None

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def presigned_url(self, key: str, expires: int = 7 * 24 * 3600) -> str | None:
        """An https URL a browser can open for ``expires`` seconds (None: the backend has no
        such thing; a local folder is only a file:// path on its own machine)."""
        return None

    # Convenience on top of the primitives.
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str, **kw) -> str:
        return self.write_bytes(key, text.encode("utf-8"), **kw)

    def read_json(self, key: str, *, missing_ok: bool = False):
        """The parsed JSON document at ``key``; None when absent and ``missing_ok``."""
        try:
            return json.loads(self.read_bytes(key))
        except FileNotFoundError:
            if missing_ok:
                return None
            raise

    def write_json(self, key: str, obj, **kw) -> str:
        """Writes ``obj`` as indented JSON; ``kw`` are write_bytes' conditions."""
        return self.write_text(key, json.dumps(obj, indent=2, default=str), **kw)

    def read_table(self, key: str, columns: list[str] | None = None):
        """A Parquet file as a pyarrow Table (no pandas: what planning reads)."""
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(key)), columns=columns)

    def read_parquet(self, key: str, columns: list[str] | None = None):
        """A Parquet file as a DataFrame; the ``meta`` it was written with is in
        ``df.attrs["darkroom"]`` (absent when it had none)."""
        table = self.read_table(key, columns)
        df = table.to_pandas()
        if (meta := (table.schema.metadata or {}).get(PARQUET_META)) is not None:
            df.attrs["darkroom"] = json.loads(meta)
        return df

    def write_parquet(self, key: str, df, *, schema=None, meta: dict | None = None) -> str:
        """Writes a DataFrame or a pyarrow Table (with ``schema``, a pyarrow schema, when
        given) and an optional JSON-able ``meta`` dict kept in the file's schema metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(df, pa.Table):
            table = df if schema is None else df.cast(schema)
        else:
            table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        if meta is not None:
            merged = {**(table.schema.metadata or {}), PARQUET_META: json.dumps(meta).encode()}
            table = table.replace_schema_metadata(merged)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(key, buf.getvalue())

    def read_csv(self, key: str, **kw):
        import pandas as pd

        return pd.read_csv(io.BytesIO(self.read_bytes(key)), **kw)

    def write_csv(self, key: str, df) -> str:
        return self.write_text(key, df.to_csv(index=False))


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_file(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        # mkstemp makes 0600 files; others sharing the folder should read what we publish.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
