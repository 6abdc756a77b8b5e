"""The S3 backend of ``darkroom.storage``: a bucket and prefix through boto3 (AWS, MinIO, or any
S3-compatible endpoint named in AWS_ENDPOINT_URL)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from darkroom.config import RuntimeConfig
from darkroom.storage.base import (
    ObjectInfo,
    PreconditionFailed,
    Storage,
    StorageError,
    StorageSetupError,
    check_key,
)
from darkroom.storage.s3_client import (
    DENIED,
    BodyMismatch,
    error_code,
    is_md5_etag,
    new_client,
)

log = logging.getLogger(__name__)

# A body that breaks off arrives after boto returned the response, so boto's own retries are
# spent by then: read_bytes repeats the whole GET, with backoff, this many times at most.
BODY_ATTEMPTS = 4
BODY_BACKOFF_SECONDS = 0.2  # doubled after each broken read
CHUNK_BYTES = 1 << 20  # a download's body is written this much at a time
DELETE_BATCH = 1000  # keys per DeleteObjects request: S3's limit


class S3Storage(Storage):
    """An S3 bucket and prefix through boto3 (AWS, MinIO, or any endpoint in AWS_ENDPOINT_URL)."""

    def __init__(self, bucket: str, prefix: str = "", client=None, pool: int | None = None):
        """
        Args:
            client: a boto3 S3 client to use as it is (tests: one that bypasses a proxy).
            pool: connections the client keeps open (default: the config's
                download_concurrency, so that every download thread has one).
        """
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.pool = pool or RuntimeConfig.model_fields["download_concurrency"].default
        self._wider: dict[int, S3Storage] = {}
        self.client = client or new_client(self.pool)
        self._own_client = client is None

    def for_threads(self, threads: int) -> S3Storage:
        """This root with a connection per thread: threads beyond the pool would wait for a
        connection (and urllib3 would warn that its pool is full)."""
        if threads <= self.pool or not self._own_client:
            return self
        if threads not in self._wider:  # one client per size, reused by later calls
            self._wider[threads] = S3Storage(self.bucket, self.prefix, pool=threads)
        return self._wider[threads]

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError

        return ClientError, BotoCoreError

    def _endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def storage_error(self, e: Exception, what: str) -> Exception:
        """The darkroom error for a boto3 failure of ``what`` (a retry cannot fix credentials,
        permissions or a missing bucket: those are StorageSetupError), else ``e`` itself."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageSetupError(
                f"no AWS credentials to read {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"cannot reach the S3 endpoint {self._endpoint()}: {e}")
        code = e.response["Error"]["Code"] if isinstance(e, ClientError) else ""
        if code == "NoSuchBucket":
            return StorageSetupError(
                f"bucket {self.bucket!r} does not exist at {self._endpoint()}: create it, or "
                "fix --storage (and AWS_ENDPOINT_URL)"
            )
        if code in DENIED:
            code = "403" if code == "AccessDenied" else code  # what a HEAD (no body) says too
            return StorageSetupError(
                f"access denied ({code}) to {self.uri} while trying to {what}: check the "
                "credentials and the bucket policy"
            )
        return e

    def check(self) -> None:
        what = "list the bucket"
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._rel_prefix(), MaxKeys=1)
        except Exception as e:
            raise self.storage_error(e, what) from e

    def _rel_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        ClientError, _ = self._errors()
        full = self._rel_prefix() + prefix
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
        except Exception as e:
            error = self.storage_error(e, f"list {prefix or '/'}")
            if error is e and isinstance(e, ClientError):
                error = StorageError(f"cannot list {self.uri}/{prefix}: {e}")
            raise error from e

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; a body that breaks off mid-stream is fetched again.

        Raises:
            FileNotFoundError: no such object.
            StorageError: every attempt broke off (retriable later: the network is sick).
        """
        url = self.url(key)
        return self._body_retries(
            lambda: self._get(key)["Body"].read(), f"reading {url}", f"{BODY_ATTEMPTS} times"
        )

    def _body_retries(self, attempt, what: str, how_often: str):
        """``attempt()``, repeated with backoff while the body breaks off: boto's own retries
        end when the response headers arrive, so they never see a body cut short."""
        from botocore.exceptions import FlexibleChecksumError
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS  # what download_file retries

        broken = (*S3_RETRYABLE_DOWNLOAD_ERRORS, FlexibleChecksumError, BodyMismatch)
        for n in range(1, BODY_ATTEMPTS + 1):
            try:
                return attempt()
            except broken as e:
                error = e
                log.info("%s broke off (%s), attempt %d", what, e, n)
                if n < BODY_ATTEMPTS:
                    time.sleep(BODY_BACKOFF_SECONDS * 2 ** (n - 1))
        raise StorageError(f"{what} broke off {how_often} in a row: {error}") from error

    def _get(self, key: str, **conditions) -> dict:
        """One GET of ``key`` (its body still unread), with darkroom's errors."""
        ClientError, _ = self._errors()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **conditions)
        except ClientError as e:
            if error_code(e) in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            if "IfMatch" in conditions and error_code(e) in ("PreconditionFailed", "412"):
                raise StorageError(
                    f"{self.url(key)} changed since it was listed: the next sync fetches it"
                ) from e
            raise self.storage_error(e, f"read {key}") from e

    def head(self, key: str) -> dict | None:
        ClientError, _ = self._errors()
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self.storage_error(e, f"read {key}") from e

    def presigned_url(self, key: str, expires: int = 7 * 24 * 3600) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )

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
                if (etag := self._landed_before(key, data, e)) is not None:
                    return etag
                raise PreconditionFailed(f"{self.url(key)} changed since it was read") from e
            if if_match is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise PreconditionFailed(f"{self.url(key)} no longer exists") from e
            raise self.storage_error(e, f"write {key}") from e
        return resp["ETag"].strip('"')

    def _landed_before(self, key: str, data: bytes, error: Exception) -> str | None:
        """The etag of ``key`` when a conditional PUT that boto sent again was refused because
        its first try had landed (the reply was lost on the way back, so the retry found the
        object already changed: by this very write). None when the object holds other bytes,
        or when the refusal came on the first try."""
        if not error.response.get("ResponseMetadata", {}).get("RetryAttempts"):
            return None
        try:
            current = self._get(key)
            body = current["Body"].read()
        except (FileNotFoundError, StorageError):
            return None
        if body != data:
            return None
        log.info("%s: the write's first try had landed (its reply was lost)", self.url(key))
        return current["ETag"].strip('"')

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _delete_many(self, keys: list[str]) -> dict[str, str]:
        """DeleteObjects, ``DELETE_BATCH`` keys a request; S3 answers per key."""
        failed = {}
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self._key(k)} for k in keys[start : start + DELETE_BATCH]]
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except Exception as e:
                raise self.storage_error(e, f"delete {len(batch)} objects") from e
            for err in resp.get("Errors", []):
                failed[self._rel(err["Key"])] = f"{err.get('Code')}: {err.get('Message')}"
        return failed

    def download(self, key: str, dest: Path, expected: ObjectInfo | None = None) -> None:
        """One GET streamed to a temp file beside ``dest``, checked, then renamed: no HEAD.
        With ``expected`` (the listing's entry) the GET asks for that very version (If-Match).
        The file must have the size of the response and the listing, and its MD5 where the
        ETag is one; a body that breaks off or differs is fetched again."""
        if not dest.parent.is_dir():  # one stat: the folder is there for all but the first
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        url = self.url(key)
        try:
            self._body_retries(
                lambda: self._stream_to(key, tmp, expected), f"downloading {url}", "every time"
            )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _stream_to(self, key: str, tmp: Path, expected: ObjectInfo | None) -> None:
        conditions = {"IfMatch": f'"{expected.etag}"'} if expected else {}
        resp = self._get(key, **conditions)
        body, md5, size = resp["Body"], hashlib.md5(usedforsecurity=False), 0
        # A small body in one read: a sized read allocates (and zeroes) the size it asks for.
        small = resp["ContentLength"] <= CHUNK_BYTES
        with open(tmp, "wb") as f:  # a retry starts the file over
            for chunk in [body.read()] if small else body.iter_chunks(CHUNK_BYTES):
                f.write(chunk)
                md5.update(chunk)
                size += len(chunk)
        # The listing's size (0: not known, as for scoring's keys) and the response's agree:
        # If-Match pinned the version.
        want = {resp["ContentLength"]} | ({expected.size} if expected and expected.size else set())
        if want != {size}:
            raise BodyMismatch(f"got {size} bytes of {self.url(key)}, expected {max(want)}")
        etag = resp.get("ETag", "").strip('"')
        if is_md5_etag(etag, resp) and md5.hexdigest() != etag:
            raise BodyMismatch(f"the bytes of {self.url(key)} do not match its ETag {etag}")
