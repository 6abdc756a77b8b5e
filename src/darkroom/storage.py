"""One storage interface with two backends: a local folder and S3 (boto3).

A storage root is a URI: ``file:///abs/path``, ``file://./relative`` or ``s3://bucket/prefix``.
Keys are POSIX paths relative to the root (``labeled/cat/1.jpg``). Nothing else in darkroom
touches boto3 or the folder layout.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_STORAGE = "file://./data/bucket"

# darkroom reads these prefixes and never writes, moves or deletes anything under them.
READ_ONLY_PREFIXES = ("labeled/", "incoming/")


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must fix (bad URI, missing bucket...)."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed since it was read."""


class UnsafeKeyError(ValueError):
    """A key that would escape the cache or storage root."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


def default_storage_uri() -> str:
    return os.environ.get("DARKROOM_STORAGE", DEFAULT_STORAGE)


def check_key(key: str) -> str:
    """Returns ``key`` if it is a safe relative POSIX path, else raises UnsafeKeyError."""
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


class Storage:
    """Interface shared by the backends. ``uri`` identifies the root."""

    uri: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
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

    def download(self, key: str, dest: Path) -> None:
        """Copies ``key`` to ``dest`` atomically (temp file, then rename)."""
        data = self.read_bytes(key)
        atomic_write_file(dest, data)

    def local_path(self, key: str) -> Path | None:
        """A path to read ``key`` in place, when the backend is a local folder."""
        return None

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    # Convenience on top of the primitives.
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str, **kw) -> str:
        return self.write_bytes(key, text.encode("utf-8"), **kw)


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


def _is_temp_or_hidden(name: str) -> bool:
    return name.startswith(".")


class LocalStorage(Storage):
    """A folder on disk. Etags are ``<mtime_ns>-<size>`` so listing never reads file contents."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        # Conditional writes on one host: a lock file per key serialises check-and-swap.
        self._locks = self.root / ".darkroom-locks"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    @staticmethod
    def _etag_of(st: os.stat_result) -> str:
        return f"{st.st_mtime_ns:x}-{st.st_size:x}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the folder the prefix names, then filter on the full prefix.
        start = self.root / posixpath.dirname(prefix)
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not _is_temp_or_hidden(d)]
            for name in filenames:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if _is_temp_or_hidden(name) or not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # removed while listing
                modified = datetime.fromtimestamp(st.st_mtime, UTC)
                found.append(ObjectInfo(key, st.st_size, self._etag_of(st), modified))
        yield from sorted(found, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def etag(self, key: str) -> str | None:
        try:
            return self._etag_of(self._path(key).stat())
        except FileNotFoundError:
            return None

    def _put(self, key, data, if_match, if_none_match) -> str:
        path = self._path(key)
        if if_match is None and not if_none_match:
            return self._replace(path, data)
        import fcntl

        self._locks.mkdir(parents=True, exist_ok=True)
        lock_path = self._locks / (key.replace("/", "__") + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.etag(key)
            if if_none_match and current is not None:
                raise PreconditionFailed(f"{self.url(key)} already exists")
            if if_match is not None and current != if_match:
                raise PreconditionFailed(
                    f"{self.url(key)} changed since it was read (etag {current} != {if_match})"
                )
            return self._replace(path, data)

    def _replace(self, path: Path, data: bytes) -> str:
        # mtime granularity can be coarser than two quick writes: keep mtime strictly
        # increasing so no rewrite reuses an earlier etag (a stale if_match must lose).
        try:
            before = path.stat().st_mtime_ns
        except FileNotFoundError:
            before = None
        atomic_write_file(path, data)
        st = path.stat()
        if before is not None and st.st_mtime_ns <= before:
            os.utime(path, ns=(st.st_atime_ns, before + 1))
            st = path.stat()
        return self._etag_of(st)

    def download(self, key: str, dest: Path) -> None:
        atomic_write_file(dest, self.read_bytes(key))

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Storage(Storage):
    """An S3 bucket and prefix through boto3 (AWS, MinIO, or any endpoint in AWS_ENDPOINT_URL)."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # boto3 reads AWS_ENDPOINT_URL and the credential chain itself.
        self.client = client or boto3.client(
            "s3",
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32),
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError

        return ClientError, BotoCoreError

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        ClientError, _ = self._errors()
        full = (f"{self.prefix}/" if self.prefix else "") + prefix
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # folder markers made by consoles
                    yield ObjectInfo(
                        self._rel(obj["Key"]),
                        obj["Size"],
                        obj["ETag"].strip('"'),
                        obj["LastModified"],
                    )
        except ClientError as e:
            raise StorageError(f"cannot list {self.uri}/{prefix}: {e}") from e

    def read_bytes(self, key: str) -> bytes:
        ClientError, _ = self._errors()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise

    def head(self, key: str) -> dict | None:
        ClientError, _ = self._errors()
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def etag(self, key: str) -> str | None:
        h = self.head(key)
        return h["ETag"].strip('"') if h else None

    def _put(self, key, data, if_match, if_none_match) -> str:
        ClientError, _ = self._errors()
        extra = {}
        if if_match is not None:
            extra["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        try:
            # One PUT of the whole object: readers see the old or the new, never half.
            resp = self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, **extra
            )
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise PreconditionFailed(f"{self.url(key)} changed since it was read") from e
            if if_match is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise PreconditionFailed(f"{self.url(key)} no longer exists") from e
            raise
        return resp["ETag"].strip('"')

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


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
            raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket[/prefix]")
        return S3Storage(parsed.netloc, parsed.path)
    if parsed.scheme == "" and uri:
        return LocalStorage(uri)
    raise StorageError(f"unsupported storage URI {uri!r}: use file://PATH or s3://BUCKET/PREFIX")


def join(*parts: str) -> str:
    return posixpath.join(*parts)
