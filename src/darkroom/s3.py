"""The S3 backend of ``darkroom.storage``: a bucket and prefix through boto3 (AWS, MinIO, or any
S3-compatible endpoint named in AWS_ENDPOINT_URL)."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from darkroom.storage import (
    ObjectInfo,
    PreconditionFailed,
    Storage,
    StorageError,
    StorageSetupError,
    check_key,
)

log = logging.getLogger(__name__)

DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
# A body that breaks off arrives after boto returned the response, so boto's own retries are
# spent by then: read_bytes repeats the whole GET, with backoff, this many times at most.
BODY_ATTEMPTS = 4
BODY_BACKOFF_SECONDS = 0.2  # doubled after each broken read


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
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS  # what download_file retries

        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                return self._get_body(key)
            except S3_RETRYABLE_DOWNLOAD_ERRORS as e:
                error = e
                log.info("reading %s broke off (%s), attempt %d", self.url(key), e, attempt)
                if attempt < BODY_ATTEMPTS:
                    time.sleep(BODY_BACKOFF_SECONDS * 2 ** (attempt - 1))
        raise StorageError(
            f"reading {self.url(key)} broke off {BODY_ATTEMPTS} times in a row: {error}"
        ) from error

    def _get_body(self, key: str) -> bytes:
        ClientError, _ = self._errors()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
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
                raise PreconditionFailed(f"{self.url(key)} changed since it was read") from e
            if if_match is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise PreconditionFailed(f"{self.url(key)} no longer exists") from e
            raise self.storage_error(e, f"write {key}") from e
        return resp["ETag"].strip('"')

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def download(self, key: str, dest: Path) -> None:
        from boto3.exceptions import RetriesExceededError  # download_file gave up

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        try:
            # s3transfer repeats a GET whose body breaks off (5 attempts) by itself.
            self.client.download_file(self.bucket, self._key(key), str(tmp))
            os.replace(tmp, dest)
        except RetriesExceededError as e:
            raise StorageError(
                f"downloading {self.url(key)} broke off every time: {e.last_exception}"
            ) from e
        except self._errors() as e:
            if _code(e) in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            raise self.storage_error(e, f"read {key}") from e
        finally:
            tmp.unlink(missing_ok=True)


def _code(e: Exception) -> str:
    """The S3 error code of a boto3 ClientError ("" for any other error)."""
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")
