"""S3Storage against a real S3 HTTP endpoint (moto server), checked with a plain boto3 client."""

from __future__ import annotations

import hashlib

import pytest

from darkroom.storage import PreconditionFailed, open_storage
from darkroom.storage.s3 import S3Storage
from tests.s3.conftest import list_keys

pytestmark = pytest.mark.s3


def _get(s3_env, key: str) -> dict:
    return s3_env["client"].get_object(Bucket=s3_env["bucket"], Key=f"{s3_env['prefix']}/{key}")


def test_open_storage_gives_s3_backend_with_bucket_and_prefix(s3_env):
    storage = open_storage(s3_env["uri"])
    assert isinstance(storage, S3Storage)
    assert storage.bucket == s3_env["bucket"]
    assert storage.prefix == s3_env["prefix"]
    assert storage.uri == s3_env["uri"]


def test_write_lands_under_prefix_and_reads_back(s3_env):
    storage = open_storage(s3_env["uri"])
    data = b"some report bytes \x00\xff"
    etag = storage.write_bytes("reports/a/b.bin", data)

    obj = _get(s3_env, "reports/a/b.bin")
    assert obj["Body"].read() == data
    assert etag == obj["ETag"].strip('"')
    assert '"' not in etag
    assert etag == hashlib.md5(data).hexdigest()  # single-part PUT: the MD5 of the bytes
    # Nothing was written at the bucket root or elsewhere.
    assert set(list_keys(s3_env["client"], s3_env["bucket"])) == {
        f"{s3_env['prefix']}/reports/a/b.bin"
    }

    assert storage.read_bytes("reports/a/b.bin") == data
    assert storage.exists("reports/a/b.bin")
    assert storage.etag("reports/a/b.bin") == etag


def test_text_round_trip(s3_env):
    storage = open_storage(s3_env["uri"])
    storage.write_text("notes/x.json", '{"é": 1}')
    assert _get(s3_env, "notes/x.json")["Body"].read() == '{"é": 1}'.encode()
    assert storage.read_text("notes/x.json") == '{"é": 1}'


def test_missing_key(s3_env):
    storage = open_storage(s3_env["uri"])
    with pytest.raises(FileNotFoundError, match="nothing/here.bin"):
        storage.read_bytes("nothing/here.bin")
    assert not storage.exists("nothing/here.bin")
    assert storage.etag("nothing/here.bin") is None


def test_objects_written_by_others_are_seen_relative_to_prefix(s3_env):
    client, bucket, prefix = s3_env["client"], s3_env["bucket"], s3_env["prefix"]
    client.put_object(Bucket=bucket, Key=f"{prefix}/labeled/cat/1.png", Body=b"abc")
    client.put_object(Bucket=bucket, Key=f"{prefix}/labeled/dog/deep/2.png", Body=b"defgh")
    client.put_object(Bucket=bucket, Key=f"{prefix}/incoming/3.png", Body=b"z")
    client.put_object(Bucket=bucket, Key=f"{prefix}/labeled/", Body=b"")  # a console folder
    client.put_object(Bucket=bucket, Key="elsewhere/labeled/x.png", Body=b"no")
    client.put_object(Bucket=bucket, Key=f"{prefix}-sibling/labeled/y.png", Body=b"no")
    storage = open_storage(s3_env["uri"])

    listed = {o.key: o for o in storage.list("labeled/")}
    assert sorted(listed) == ["labeled/cat/1.png", "labeled/dog/deep/2.png"]
    assert listed["labeled/cat/1.png"].size == 3
    assert listed["labeled/dog/deep/2.png"].size == 5
    for key, info in listed.items():
        head = client.head_object(Bucket=bucket, Key=f"{prefix}/{key}")
        assert info.etag == head["ETag"].strip('"')
        assert '"' not in info.etag
        assert info.last_modified is not None
        assert (
            storage.read_bytes(key)
            == client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()
        )

    everything = sorted(o.key for o in storage.list())
    assert everything == ["incoming/3.png", "labeled/cat/1.png", "labeled/dog/deep/2.png"]


def test_list_paginates_past_one_page(s3_env):
    client, bucket, prefix = s3_env["client"], s3_env["bucket"], s3_env["prefix"]
    for i in range(1005):  # one list_objects_v2 page holds at most 1000 keys
        client.put_object(Bucket=bucket, Key=f"{prefix}/incoming/{i:05d}.png", Body=b"x")
    keys = [o.key for o in open_storage(s3_env["uri"]).list("incoming/")]
    assert len(keys) == 1005
    assert keys[-1] == "incoming/01004.png"


@pytest.mark.parametrize("key", ["labeled/cat/1.png", "incoming/new.png"])
def test_writes_to_user_sources_refused(s3_env, key):
    client, bucket, prefix = s3_env["client"], s3_env["bucket"], s3_env["prefix"]
    client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"original")
    storage = open_storage(s3_env["uri"])
    with pytest.raises(PermissionError):
        storage.write_bytes(key, b"overwritten")
    with pytest.raises(PermissionError):
        storage.write_bytes(f"{key}.new", b"new")
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read() == b"original"
    assert f"{prefix}/{key}.new" not in list_keys(client, bucket)


def test_put_source_object_never_overwrites(s3_env):
    storage = open_storage(s3_env["uri"])
    first = storage.put_source_object("labeled/a/1.png", b"first")
    again = storage.put_source_object("labeled/a/1.png", b"second")
    assert again == first
    assert _get(s3_env, "labeled/a/1.png")["Body"].read() == b"first"


@pytest.mark.parametrize(
    "key", ["../escape.json", "a/../../b.json", "/abs.json", "a\\b.json", "a//b.json", ""]
)
def test_unsafe_keys_refused(s3_env, key):
    storage = open_storage(s3_env["uri"])
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")
    assert list_keys(s3_env["client"], s3_env["bucket"]) == {}


def test_if_none_match_refuses_existing_key(s3_env):
    storage = open_storage(s3_env["uri"])
    created = storage.write_bytes("models/champion.json", b"v1", if_none_match=True)
    assert created == hashlib.md5(b"v1").hexdigest()
    with pytest.raises(PreconditionFailed):
        storage.write_bytes("models/champion.json", b"v2", if_none_match=True)
    assert _get(s3_env, "models/champion.json")["Body"].read() == b"v1"


def test_if_match_with_stale_etag_fails(s3_env):
    storage = open_storage(s3_env["uri"])
    stale = storage.write_bytes("models/champion.json", b"v1")
    # Someone else replaces the pointer behind our back.
    s3_env["client"].put_object(
        Bucket=s3_env["bucket"], Key=f"{s3_env['prefix']}/models/champion.json", Body=b"other"
    )
    with pytest.raises(PreconditionFailed):
        storage.write_bytes("models/champion.json", b"v2", if_match=stale)
    assert _get(s3_env, "models/champion.json")["Body"].read() == b"other"


def test_if_match_with_current_etag_succeeds(s3_env):
    storage = open_storage(s3_env["uri"])
    storage.write_bytes("models/champion.json", b"v1")
    current = storage.etag("models/champion.json")
    new = storage.write_bytes("models/champion.json", b"v2", if_match=current)
    obj = _get(s3_env, "models/champion.json")
    assert obj["Body"].read() == b"v2"
    assert new == obj["ETag"].strip('"') != current
    # The etag just consumed is now stale.
    with pytest.raises(PreconditionFailed):
        storage.write_bytes("models/champion.json", b"v3", if_match=current)
    assert _get(s3_env, "models/champion.json")["Body"].read() == b"v2"


def test_if_match_on_missing_key_fails(s3_env):
    # S3 answers 404 NoSuchKey (not 412) when If-Match names an absent object; the interface
    # promises PreconditionFailed, as LocalStorage raises (a pointer deleted under a promotion).
    storage = open_storage(s3_env["uri"])
    with pytest.raises(PreconditionFailed):
        storage.write_bytes("models/champion.json", b"v1", if_match="0" * 32)
    assert list_keys(s3_env["client"], s3_env["bucket"]) == {}


def test_download_writes_exact_bytes_without_temp_leftovers(s3_env, tmp_path):
    s3_env["client"].put_object(
        Bucket=s3_env["bucket"], Key=f"{s3_env['prefix']}/blob.bin", Body=bytes(range(256)) * 40
    )
    dest = tmp_path / "d" / "blob.bin"
    open_storage(s3_env["uri"]).download("blob.bin", dest)
    assert dest.read_bytes() == bytes(range(256)) * 40
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]


def test_missing_bucket_is_an_error_not_an_empty_listing(s3_env):
    from darkroom.storage import StorageError

    storage = open_storage(f"s3://no-such-bucket-{s3_env['bucket'][-12:]}/x")
    with pytest.raises(StorageError):
        list(storage.list("labeled/"))


def _with_weights(storage, version: str) -> None:
    storage.write_bytes(f"models/{version}/model.safetensors", b"weights")


def test_promotion_race_on_s3_loses_cleanly(s3_env):
    from darkroom.registry import pointer as registry

    storage = open_storage(s3_env["uri"])
    for v in ("v1", "v2", "v3"):
        _with_weights(storage, v)
    registry.promote(storage, "v1", expected_etag=None, action="promote", reason="first")
    with pytest.raises(registry.PromotionLost):  # a second "first" promotion
        registry.promote(storage, "v2", expected_etag=None, action="promote", reason="first")
    champion, etag = registry.read_champion(storage)
    assert champion.version == "v1"
    registry.promote(storage, "v2", expected_etag=etag, action="promote", reason="better")
    with pytest.raises(registry.PromotionLost):  # read v1's etag, v2 won meanwhile
        registry.promote(storage, "v3", expected_etag=etag, action="promote", reason="better")
    body = _get(s3_env, "models/champion.json")["Body"].read()
    assert b'"version": "v2"' in body
    assert [r.version for r in registry.history(storage)] == ["v1", "v2"]


def test_promotion_against_deleted_pointer_is_lost_not_a_crash(s3_env):
    from darkroom.registry import pointer as registry

    storage = open_storage(s3_env["uri"])
    _with_weights(storage, "v1")
    _with_weights(storage, "v2")
    registry.promote(storage, "v1", expected_etag=None, action="promote", reason="first")
    _, etag = registry.read_champion(storage)
    s3_env["client"].delete_object(
        Bucket=s3_env["bucket"], Key=f"{s3_env['prefix']}/models/champion.json"
    )
    with pytest.raises(registry.PromotionLost):
        registry.promote(storage, "v2", expected_etag=etag, action="promote", reason="better")
    assert not storage.exists("models/champion.json")


def test_a_presigned_url_serves_the_object_to_a_plain_http_client(s3_env):
    import httpx

    storage = open_storage(s3_env["uri"])
    storage.write_bytes("models/v1/curves.png", b"\x89PNG plot bytes")
    url = storage.presigned_url("models/v1/curves.png", expires=60)
    assert url.startswith(s3_env["endpoint"]) and "Signature" in url
    assert httpx.get(url, timeout=10).content == b"\x89PNG plot bytes"
    assert open_storage("file:///tmp").presigned_url("x.png") is None  # local: links only
