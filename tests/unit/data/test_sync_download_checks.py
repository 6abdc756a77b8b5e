"""The S3 backend's own parsing and checks, against botocore's: timestamps parsed with the
standard library read the same as botocore's parser reads them, and a body is checked against
its ETag only where the ETag is an MD5 of it."""

from __future__ import annotations

import pytest
from botocore.utils import parse_timestamp

from darkroom.storage.s3_client import is_md5_etag, s3_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-24T04:18:33.000Z",  # a listing's LastModified
        "2026-11-24T04:18:33.123456+02:00",
        "Tue, 24 Nov 2026 04:18:33 GMT",  # a GET's Last-Modified header
        "Tue, 24 Nov 2026 04:18:33 -0000",  # RFC 2822's "zone unknown": botocore's fallback
        "2026-11-24",  # no zone at all: botocore's fallback
        "1700000000",
        1700000000,
        1700000000.5,
    ],
)
def test_timestamps_read_as_botocore_reads_them(value):
    got = s3_timestamp(value)
    assert got == parse_timestamp(value)
    assert got.utcoffset() == parse_timestamp(value).utcoffset()


def test_a_bad_timestamp_fails_as_in_botocore():
    with pytest.raises(ValueError):
        parse_timestamp("yesterday-ish")
    with pytest.raises(ValueError):
        s3_timestamp("yesterday-ish")


MD5 = "5d41402abc4b2a76b9719d911017c592"


@pytest.mark.parametrize(
    ("etag", "response", "is_md5"),
    [
        (MD5, {}, True),
        (MD5, {"ServerSideEncryption": "AES256"}, True),  # SSE-S3 keeps the MD5
        (MD5, {"ServerSideEncryption": "aws:kms"}, False),
        (MD5, {"ServerSideEncryption": "aws:kms:dsse"}, False),
        (MD5, {"SSECustomerAlgorithm": "AES256"}, False),
        (f"{MD5}-3", {}, False),  # multipart: an MD5 of the parts' MD5s
        ("5d41402abc4b2a76", {}, False),
        (MD5[:31] + "g", {}, False),  # not hex
    ],
)
def test_which_etags_are_an_md5_of_the_body(etag, response, is_md5):
    assert is_md5_etag(etag, response) is is_md5
