"""The boto3 side of the S3 backend: darkroom's one session and its clients, how S3 replies
are read (timestamps, ETags, error codes), and which failures a retry cannot fix."""

from __future__ import annotations

import threading
from datetime import datetime
from email.utils import parsedate_to_datetime

from darkroom.storage.base import StorageError

DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}

_session = None
_session_lock = threading.Lock()  # a boto3 Session is not safe to build clients from at once


def new_client(pool: int):
    """An S3 client with ``pool`` connections, from darkroom's one boto3 session per process.

    boto3 reads AWS_ENDPOINT_URL, the region and the credential chain itself when the client
    is made. The session parses response timestamps with the standard library: every GET and
    every listed object carries one, and dateutil's parser was a seventh of a download's CPU.
    """
    global _session
    import boto3
    import botocore.session
    from botocore.config import Config

    with _session_lock:
        if _session is None:
            core = botocore.session.get_session()
            parsers = core.get_component("response_parser_factory")
            parsers.set_parser_defaults(timestamp_parser=s3_timestamp)
            _session = boto3.session.Session(botocore_session=core)
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=pool)
        return _session.client("s3", config=config)


def s3_timestamp(value) -> datetime:
    """A timestamp of an S3 response: ISO 8601 in bodies, RFC 1123 in headers; anything else
    (epoch seconds, a date without a zone) as botocore parses it."""
    from botocore.utils import parse_timestamp

    if isinstance(value, str):
        try:
            iso = value[:4].isdigit()
            parsed = datetime.fromisoformat(value) if iso else parsedate_to_datetime(value)
            if parsed.tzinfo is not None:
                return parsed
        except (ValueError, TypeError, IndexError):
            pass
    return parse_timestamp(value)


class BodyMismatch(StorageError):
    """A downloaded body whose size or MD5 is not the object's: fetched again."""


def is_md5_etag(etag: str, resp: dict) -> bool:
    """Whether ``etag`` is the MD5 of the body: a single-part upload stored without KMS or a
    customer key (those, and multipart uploads, have ETags of another kind)."""
    encrypted = resp.get("SSECustomerAlgorithm") or "kms" in resp.get("ServerSideEncryption", "")
    return len(etag) == 32 and not encrypted and all(c in "0123456789abcdef" for c in etag)


def error_code(e: Exception) -> str:
    """The S3 error code of a boto3 ClientError ("" for any other error)."""
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")
