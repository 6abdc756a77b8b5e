"""The hostile battery (tests/hostile.py) file by file, without storage or a model: what the
index's describe step and scoring's decoder make of each file's bytes. The whole flow on S3
is tests/s3/test_hostile_files.py."""

from __future__ import annotations

import pytest

from darkroom.data.images import UnreadableImage, decode_rgb
from darkroom.data.rows import describe_image
from tests.hostile import BATTERY, Case

SCORED_AT = 32  # the scoring decoder's min_side at the tests' 32 px


@pytest.fixture(scope="module")
def described(tmp_path_factory) -> dict[str, tuple[bytes, dict]]:
    folder = tmp_path_factory.mktemp("battery")
    out = {}
    for i, case in enumerate(BATTERY):
        data = case.make()
        path = folder / f"{i}{_suffix(case)}"  # names here are plain: the bytes are the test
        path.write_bytes(data)
        out[case.path] = data, describe_image(path)
    return out


def _suffix(case: Case) -> str:
    return "." + case.path.rsplit(".", 1)[1]


@pytest.mark.parametrize("case", BATTERY, ids=lambda c: c.path)
def test_describe_and_decode_agree_with_the_battery(described, case):
    data, row = described[case.path]
    assert row["status"] == case.bytes_status, row["error"]
    if case.bytes_status != "ok":
        assert case.reason in row["error"]
        expected = (case.score, case.score_error)
    else:
        assert row["error"] == "" and row["width"] > 0 and row["image_id"]
        expected = ("ok", "")
    try:
        rgb = decode_rgb(data, min_side=SCORED_AT)
        got = ("ok", "")
        assert rgb.ndim == 3 and rgb.shape[2] == 3
    except UnreadableImage as e:
        got = (e.status, e.reason)
    assert got[0] == expected[0] and expected[1] in got[1], got


def test_every_kind_of_outcome_is_in_the_battery():
    kinds = {c.status for c in BATTERY} | {c.score for c in BATTERY}
    assert kinds >= {
        "ok", "unreadable", "too_large", "unsafe_key", "conflicting_labels", "duplicate",
        "conflicting_label_file", "unlabeled",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("0/a png named.jpg", "png"),
        ("0/cmyk.jpg", "jpg"),
        ("2/lossy.webp", "webp"),
        ("1/windows.bmp", "bmp"),
        ("1/exif-rotated.jpg", "jpg"),
    ],
)
def test_index_format_is_what_the_bytes_are_not_the_name(described, path, fmt):
    # The index once took the format from the file name: a PNG named .jpg was listed as jpg.
    assert described[path][1]["format"] == fmt
