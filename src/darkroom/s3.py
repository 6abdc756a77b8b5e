"""The S3 backend of ``darkroom.storage``: a bucket and prefix through boto3 (AWS, MinIO, or any
S3-compatible endpoint named in AWS_ENDPOINT_URL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from darkroom.storage import ObjectInfo, PreconditionFailed, Storage, StorageError, check_key


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
