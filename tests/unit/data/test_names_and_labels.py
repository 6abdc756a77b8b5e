"""Hostile names and labels files on a local root: refused or reported, never lost or fatal."""

from __future__ import annotations

import io
import logging
import os

import pandas as pd
import pytest

from darkroom.config import RetrainConfig
from darkroom.data.index import DatasetError, rebuild_index
from darkroom.data.labels import parse_labels
from darkroom.data.names import is_image_key
from darkroom.data.rows import COLUMNS
from darkroom.data.sync import sync_labeled, sync_prefix
from darkroom.scoring import plan as planning
from darkroom.scoring import watch
from darkroom.storage import BadKeyName, UnsafeKeyError, check_key, printable_key
from tests.conftest import TINY, png_bytes, write_digits

BAD_NAME = b"\xff\xfe.png"  # not UTF-8: the OS hands it to Python as surrogate escapes
SHOWN = "\\xff\\xfe.png"


def _bad_file(storage, folder: str) -> str:
    """Writes an image whose file name is not UTF-8; returns its key as listed."""
    where = os.fsencode(storage.root / folder)
    os.makedirs(where, exist_ok=True)
    fd = os.open(where + b"/" + BAD_NAME, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, png_bytes(70, 32))
    os.close(fd)
    return f"{folder}/{os.fsdecode(BAD_NAME)}"


def _config(storage, cache_dir) -> RetrainConfig:
    return RetrainConfig(storage=storage.uri, cache_dir=str(cache_dir), train=TINY)


def _index(storage, cache_dir, run: str = "run-1"):
    config = _config(storage, cache_dir)
    sync_labeled(storage, config)
    result = rebuild_index(storage, config, run)
    report = storage.read_parquet(result.quarantine) if result.quarantine else None
    return result, report


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


# ---- names ---------------------------------------------------------------------------------


def test_check_key_refuses_names_that_are_not_utf8():
    key = "labeled/0/" + os.fsdecode(BAD_NAME)
    with pytest.raises(BadKeyName, match="not valid UTF-8: rename it") as err:
        check_key(key)
    assert isinstance(err.value, UnsafeKeyError) and err.value.status == "bad_name"
    assert printable_key(key) == "labeled/0/" + SHOWN
    for fine in ("labeled/é/日本 a+b.png", "labeled/0/x.png"):
        assert check_key(fine) == fine and printable_key(fine) == fine


def test_is_image_key_skips_undecodable_names_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="darkroom.data.names"):
        assert not is_image_key("incoming/" + os.fsdecode(BAD_NAME))
    assert SHOWN in caplog.text and "rename it" in caplog.text
    assert is_image_key("incoming/日本 é+1.png")


def test_bad_name_under_labeled_lands_in_the_quarantine_report(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    bad = _bad_file(local_storage, "labeled/1")
    assert bad in {o.key for o in local_storage.list("labeled/")}  # listed, not hidden

    report, entries = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.refused_keys == ["labeled/1/" + SHOWN]
    assert report.refused_reasons["labeled/1/" + SHOWN]["status"] == "bad_name"
    assert bad not in entries and len(entries) == 12

    result, rows = _index(local_storage, cache_dir)
    assert result.rows == 12 and result.summary.excluded == {"bad_name": 1}
    assert list(rows.columns) == COLUMNS
    row = rows.set_index("key").loc["labeled/1/" + SHOWN]
    assert row["status"] == "bad_name"
    assert row["error"] == f"file name 'labeled/1/{SHOWN}' is not valid UTF-8: rename it"
    assert (row["class_index"], row["fold"], row["bytes"], row["image_id"]) == (-1, -1, 0, "")


def test_unsupported_image_format_lands_in_the_quarantine_report(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    local_storage.put_source_object("labeled/2/from phone.HEIC", b"ftypheic")
    result, rows = _index(local_storage, cache_dir)
    assert result.rows == 12 and result.summary.excluded == {"unsupported_format": 1}
    row = rows.set_index("key").loc["labeled/2/from phone.HEIC"]
    assert row["status"] == "unsupported_format" and "convert it" in row["error"]


def test_renamed_bad_file_leaves_the_report(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    bad = _bad_file(local_storage, "labeled/1")
    _index(local_storage, cache_dir)
    os.rename(os.fsencode(local_storage.root / bad), local_storage.root / "labeled/1/fixed.png")
    result, _ = _index(local_storage, cache_dir, "run-2")
    assert result.quarantine is None and result.rows == 13


def test_bad_name_under_incoming_is_never_planned(local_storage, caplog):
    local_storage.put_source_object("incoming/ok é.png", png_bytes(10))
    _bad_file(local_storage, "incoming")
    with caplog.at_level(logging.WARNING, logger="darkroom.data.names"):
        plan = planning.pending_chunks(local_storage, "v1", chunk_size=10)
    assert plan.incoming == 1
    assert [k for chunk in plan.chunks for k, _ in chunk] == ["incoming/ok é.png"]
    assert all(planning.chunk_id(chunk) for chunk in plan.chunks)  # every key encodes
    assert SHOWN in caplog.text
    new, counts = watch.new_arrivals(local_storage)
    assert [k for k, _ in new] == ["incoming/ok é.png"] and counts.incoming == 1


# ---- labels files --------------------------------------------------------------------------


def test_conflicting_and_missing_label_rows_are_reported(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    local_storage.write_text(
        "labels.csv",
        "key,label\n"
        "labeled/0/d-0000.png,0\n"  # the same label twice: harmless
        "labeled/0/d-0000.png,0\n"
        "labeled/1/d-0001.png,1\n"  # two labels for one key: neither is trusted
        "labeled/1/d-0001.png,2\n"
        "labeled/2/gone.png,2\n"  # no such object
        "2/also gone.png,NA\n",  # "NA" is a label, not a blank cell
    )
    result, rows = _index(local_storage, cache_dir)
    by_key = rows.set_index("key")
    conflict = by_key.loc["labeled/1/d-0001.png"]
    assert conflict["status"] == "conflicting_label_file"
    assert "'1', '2'" in conflict["error"] and conflict["image_id"]  # a real, described image
    assert by_key.loc["labeled/2/gone.png", ["label", "status"]].tolist() == [
        "2",
        "missing_object",
    ]
    assert by_key.loc["labeled/2/also gone.png", "label"] == "NA"
    assert "labeled/0/d-0000.png" not in by_key.index
    assert result.summary.excluded == {"conflicting_label_file": 1, "missing_object": 2}
    assert result.rows == 18  # the index keeps one row per object, the contract's columns


def test_parquet_labels_file_conflicts(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    df = pd.DataFrame({"key": ["0/d-0000.png", "0/d-0000.png"], "label": [1, 2]})
    local_storage.write_bytes("labels.parquet", _parquet(df))
    _, rows = _index(local_storage, cache_dir)
    assert rows.set_index("key").loc["labeled/0/d-0000.png", "status"] == ("conflicting_label_file")


@pytest.mark.parametrize(
    "values, found",
    [
        ([1, "1", 1.0], "1 float, 1 int, 1 str"),
        ([1.0, 2.0], "2 float"),  # whole numbers with a blank cell read back as floats
        ([True, False], "2 bool"),
    ],
)
def test_label_column_of_mixed_or_non_text_kinds_is_refused(values, found):
    df = pd.DataFrame({"key": [f"{i}.png" for i in range(len(values))], "label": values})
    with pytest.raises(DatasetError, match=f"mixes kinds.*\\({found}\\)"):
        parse_labels(df, "labels.parquet")


def test_float_parquet_label_column_stops_the_index(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    df = pd.DataFrame({"key": ["0/d-0000.png", "0/d-0012.png"], "label": [1, None]})
    local_storage.write_bytes("labels.parquet", _parquet(df))  # int + null: float64
    with pytest.raises(DatasetError, match="float"):
        _index(local_storage, cache_dir)


def test_one_number_spelled_two_ways_is_refused(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    local_storage.write_text("labels.csv", "key,label\nlabeled/0/d-0000.png,1.0\n")
    with pytest.raises(DatasetError, match="'1' and '1.0'"):
        _index(local_storage, cache_dir)


def test_integer_labels_match_folder_names(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    df = pd.DataFrame({"key": ["0/d-0000.png"], "label": [2]})
    local_storage.write_bytes("labels.parquet", _parquet(df))
    result, _ = _index(local_storage, cache_dir)
    assert result.classes == ["0", "1", "2"] and result.quarantine is None
