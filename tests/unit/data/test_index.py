"""The labeled index: contract columns, stable holdout, stratified folds, bad data reported."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from darkroom import layout
from darkroom.data import index as idx
from darkroom.data import rows as rows_module
from darkroom.data.index import DatasetError, read_index, write_index
from darkroom.data.rows import COLUMNS, build_index, is_holdout
from darkroom.data.sync import sync_prefix
from tests.conftest import png_bytes, write_digits


def _synced(storage, cache_dir):
    _, manifest = sync_prefix(storage, layout.LABELED, cache_dir)
    return manifest


def _build(storage, cache_dir, **kw):
    kw.setdefault("folds", 3)
    return build_index(_synced(storage, cache_dir), labels=idx.read_label_file(storage), **kw)


@pytest.fixture
def digits_index(local_storage, cache_dir):
    written = write_digits(local_storage, per_class=12)
    df, classes = _build(local_storage, cache_dir)
    return df, classes, written


def test_columns_and_dtypes(digits_index):
    df, classes, written = digits_index
    assert list(df.columns) == COLUMNS
    assert len(df) == len(written) == 36
    for col in ("class_index", "fold", "width", "height", "channels", "bytes"):
        assert pd.api.types.is_integer_dtype(df[col]), col
    for col in ("image_id", "key", "label", "split", "format", "etag", "status", "error"):
        assert all(isinstance(v, str) for v in df[col]), col
    assert (df["status"] == "ok").all()
    assert (df["error"] == "").all()
    assert (df[["width", "height"]] == 32).all().all()
    assert (df["channels"] == 1).all()  # written as grey PNG
    assert (df["format"] == "png").all()
    assert df["image_id"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(df["key"]) == set(written)
    assert dict(zip(df["key"], df["label"], strict=True)) == written


def test_classes_sorted_and_class_index_matches(local_storage, cache_dir):
    write_digits(local_storage, classes=("7", "3", "5"), per_class=6)
    df, classes = _build(local_storage, cache_dir, folds=2)
    assert classes == ["3", "5", "7"]
    assert (df["class_index"] == df["label"].map(classes.index)).all()


def test_holdout_is_a_pure_function_of_content(digits_index):
    df, _, _ = digits_index
    expected = df["image_id"].map(lambda h: is_holdout(h, 0.1))
    assert ((df["split"] == "holdout") == expected).all()
    assert set(df["split"]) <= {"train", "holdout"}


def test_is_holdout_fraction_bounds():
    assert is_holdout("00000000" + "f" * 56, 0.1)
    assert not is_holdout("ffffffff" + "0" * 56, 0.1)
    assert is_holdout("19999999", 0.1)  # 0x19999999 / 2**32 is just below 0.1
    assert not is_holdout("1999999a", 0.1)  # and 0x1999999a just above
    assert not any(is_holdout(f"{i:08x}", 0.0) for i in range(0, 2**32, 2**28))


def test_split_of_existing_images_never_changes_as_data_grows(local_storage, cache_dir):
    write_digits(local_storage, per_class=10)
    before, _ = _build(local_storage, cache_dir, holdout_fraction=0.3)
    write_digits(local_storage, per_class=10, offset=400)
    after, _ = _build(local_storage, cache_dir, holdout_fraction=0.3)
    assert len(after) > len(before)
    old = before.set_index("image_id")["split"]
    new = after.set_index("image_id")["split"]
    assert new.loc[old.index].tolist() == old.tolist()
    assert {"train", "holdout"} <= set(after["split"])


def test_folds_cover_train_rows_and_holdout_has_none(digits_index):
    df, _, _ = digits_index
    train = df[df["split"] == "train"]
    assert set(train["fold"]) == {0, 1, 2}
    assert (df.loc[df["split"] == "holdout", "fold"] == -1).all()


def test_folds_are_stratified(local_storage, cache_dir):
    write_digits(local_storage, classes=("0", "1", "2", "3"), per_class=17)
    df, classes = _build(local_storage, cache_dir, folds=4)
    train = df[df["split"] == "train"]
    counts = pd.crosstab(train["label"], train["fold"])
    assert list(counts.columns) == [0, 1, 2, 3]
    for label, row in counts.iterrows():
        assert row.max() - row.min() <= 1, (label, row.tolist())


def test_folds_do_not_depend_on_listing_order(digits_index):
    df, _, _ = digits_index
    from darkroom.data.fetch import CachedObject

    objs = {r.key: CachedObject(r.key, r.etag, int(r.bytes), "") for r in df.itertuples()}
    # Same rows reused from `previous`, fed in reverse insertion order.
    again, _ = build_index(dict(reversed(list(objs.items()))), folds=3, previous=df)
    pd.testing.assert_frame_equal(again, df)


def test_unreadable_file_reported_not_fatal(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    local_storage.put_source_object("labeled/0/bad.png", b"this is not a png")
    df, classes = _build(local_storage, cache_dir, folds=2)
    bad = df.set_index("key").loc["labeled/0/bad.png"]
    assert bad["status"] == "unreadable"
    assert bad["error"]
    assert bad["class_index"] == -1
    assert bad["split"] == ""
    assert bad["fold"] == -1
    assert classes == ["0", "1", "2"]
    assert (df[df["key"] != "labeled/0/bad.png"]["status"] == "ok").all()


def test_empty_file_unreadable(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    local_storage.put_source_object("labeled/1/empty.png", b"")
    df, _ = _build(local_storage, cache_dir, folds=2)
    assert df.set_index("key").loc["labeled/1/empty.png", "status"] == "unreadable"


def test_one_class_fails_naming_it(local_storage, cache_dir):
    write_digits(local_storage, classes=("4",), per_class=10)
    with pytest.raises(DatasetError, match="'4'"):
        _build(local_storage, cache_dir)


def test_no_usable_images_fails(local_storage, cache_dir):
    local_storage.put_source_object("labeled/a/x.png", b"junk")
    with pytest.raises(DatasetError, match="at least 2 classes"):
        _build(local_storage, cache_dir)


def test_class_smaller_than_folds_fails_naming_class(local_storage, cache_dir):
    write_digits(local_storage, classes=("0", "1"), per_class=12)
    write_digits(local_storage, classes=("2",), per_class=3)
    with pytest.raises(DatasetError) as err:
        _build(local_storage, cache_dir, folds=5, holdout_fraction=0.0)
    msg = str(err.value)
    assert "'2'" in msg and "'0'" not in msg and "'1'" not in msg
    assert "--folds" in msg
    assert "5" in msg


def test_labels_csv_overrides_folders(local_storage, cache_dir):
    written = write_digits(local_storage, per_class=6)
    local_storage.put_source_object("labeled/loose.png", png_bytes(200, 32))
    relabel = "labeled/0/d-0000.png"
    local_storage.write_text(
        "labels.csv", f"key,label\n{relabel},2\nloose.png,1\n"
    )  # key relative to labeled/
    df, _ = _build(local_storage, cache_dir, folds=2)
    rows = df.set_index("key")
    assert rows.loc[relabel, "label"] == "2"
    assert rows.loc[relabel, "class_index"] == 2
    assert rows.loc["labeled/loose.png", "label"] == "1"
    assert rows.loc["labeled/loose.png", "status"] == "ok"
    others = [k for k in written if k != relabel]
    assert rows.loc[others, "label"].tolist() == [written[k] for k in others]


def test_blank_label_cell_falls_back_to_folder(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    local_storage.write_text(
        "labels.csv", "key,label\nlabeled/0/d-0000.png,\nlabeled/1/d-0001.png,2\n"
    )
    assert idx.read_label_file(local_storage) == {"labeled/1/d-0001.png": "2"}
    df, classes = _build(local_storage, cache_dir, folds=2)
    assert classes == ["0", "1", "2"]
    assert df.set_index("key").loc["labeled/0/d-0000.png", "label"] == "0"


def test_labels_parquet(local_storage, cache_dir):
    import io

    write_digits(local_storage, per_class=4)
    buf = io.BytesIO()
    pd.DataFrame({"key": ["0/d-0000.png"], "label": [1]}).to_parquet(buf)
    local_storage.write_bytes("labels.parquet", buf.getvalue())
    df, _ = _build(local_storage, cache_dir, folds=2)
    assert df.set_index("key").loc["labeled/0/d-0000.png", "label"] == "1"


def test_labels_file_without_columns_fails(local_storage):
    local_storage.write_text("labels.csv", "file,class\na.png,x\n")
    with pytest.raises(DatasetError, match="'key' and 'label'"):
        idx.read_label_file(local_storage)


def test_file_directly_under_labeled_is_unlabeled(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    local_storage.put_source_object("labeled/stray.png", png_bytes(90, 32))
    df, classes = _build(local_storage, cache_dir, folds=2)
    row = df.set_index("key").loc["labeled/stray.png"]
    assert row["status"] == "unlabeled"
    assert row["error"]
    assert row["class_index"] == -1 and row["split"] == "" and row["fold"] == -1
    assert "" not in classes


def test_duplicate_in_same_class(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    data = png_bytes(33, 32)
    local_storage.put_source_object("labeled/0/a.png", data)
    local_storage.put_source_object("labeled/0/b.png", data)
    df, _ = _build(local_storage, cache_dir, folds=2)
    rows = df.set_index("key")
    assert rows.loc["labeled/0/a.png", "status"] == "ok"
    assert rows.loc["labeled/0/b.png", "status"] == "duplicate"
    assert "labeled/0/a.png" in rows.loc["labeled/0/b.png", "error"]
    assert rows.loc["labeled/0/b.png", "split"] == ""
    assert rows.loc["labeled/0/b.png", "fold"] == -1


def test_same_content_under_two_labels_conflicts(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    data = png_bytes(44, 32)
    local_storage.put_source_object("labeled/1/x.png", data)
    local_storage.put_source_object("labeled/2/y.png", data)
    df, _ = _build(local_storage, cache_dir, folds=2)
    rows = df.set_index("key")
    for key in ("labeled/1/x.png", "labeled/2/y.png"):
        assert rows.loc[key, "status"] == "conflicting_labels"
        assert rows.loc[key, "error"]
        assert rows.loc[key, "class_index"] == -1


def test_write_read_round_trip(local_storage, cache_dir, digits_index):
    df, classes, _ = digits_index
    pointer = write_index(local_storage, df, classes, folds=3)
    back, back_classes, snap = read_index(local_storage)
    pd.testing.assert_frame_equal(back, df)
    assert back_classes == classes
    assert snap == pointer["snapshot"] == idx.snapshot_id(df, classes)
    latest = json.loads(local_storage.read_text(layout.INDEX_LATEST))
    assert latest["snapshot"] == snap
    assert latest["key"] == f"index/{snap}.parquet"
    assert local_storage.exists(latest["key"])
    assert latest["rows"] == len(df)
    # Class names come from the Parquet metadata, not from the rows.
    import io

    import pyarrow.parquet as pq

    meta = pq.read_schema(io.BytesIO(local_storage.read_bytes(latest["key"]))).metadata
    assert json.loads(meta[b"darkroom"])["classes"] == classes
    assert read_index(local_storage, snap)[2] == snap


def test_read_index_missing(local_storage):
    with pytest.raises(FileNotFoundError, match="latest.json"):
        read_index(local_storage)


def test_same_data_same_snapshot_not_rewritten(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    df1, c1 = _build(local_storage, cache_dir, folds=2)
    p1 = write_index(local_storage, df1, c1)
    etag = local_storage.etag(p1["key"])
    df2, c2 = _build(local_storage, cache_dir, folds=2)
    p2 = write_index(local_storage, df2, c2)
    assert p2["snapshot"] == p1["snapshot"]
    assert local_storage.etag(p1["key"]) == etag
    assert [o.key for o in local_storage.list("index/")] == sorted([p1["key"], layout.INDEX_LATEST])


def test_different_data_new_snapshot(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    p1 = write_index(local_storage, *_build(local_storage, cache_dir, folds=2))
    write_digits(local_storage, per_class=6, offset=300)
    p2 = write_index(local_storage, *_build(local_storage, cache_dir, folds=2))
    assert p2["snapshot"] != p1["snapshot"]
    assert local_storage.exists(p1["key"])  # old snapshots stay
    assert read_index(local_storage)[2] == p2["snapshot"]


def test_previous_rows_reused_without_decoding(local_storage, cache_dir, monkeypatch):
    write_digits(local_storage, per_class=6)
    local_storage.put_source_object("labeled/0/bad.png", b"garbage")
    manifest = _synced(local_storage, cache_dir)
    df, classes = build_index(manifest, folds=2)
    write_index(local_storage, df, classes)
    previous, _, _ = read_index(local_storage)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although previous covers it")

    monkeypatch.setattr(rows_module, "describe_image", no_decoding)
    again, again_classes = build_index(manifest, folds=2, previous=previous)
    pd.testing.assert_frame_equal(again, df)
    assert again_classes == classes


def test_previous_reuse_decodes_only_new_or_changed(local_storage, cache_dir, monkeypatch):
    write_digits(local_storage, per_class=6)
    df, _ = build_index(_synced(local_storage, cache_dir), folds=2)
    write_digits(local_storage, classes=("0",), per_class=1, offset=500)
    decoded = []
    real = rows_module.describe_image

    def spy(path, *args):
        decoded.append(path)
        return real(path, *args)

    monkeypatch.setattr(rows_module, "describe_image", spy)
    again, _ = build_index(_synced(local_storage, cache_dir), folds=2, previous=df)
    assert len(decoded) == 1
    assert len(again) == len(df) + 1


def test_previous_row_with_other_etag_is_decoded_again(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    manifest = _synced(local_storage, cache_dir)
    df, _ = build_index(manifest, folds=2)
    stale = df.copy()
    stale["image_id"] = "f" * 64  # what a stale row would claim
    stale["etag"] = "other"
    again, _ = build_index(manifest, folds=2, previous=stale)
    pd.testing.assert_frame_equal(again, df)


def test_summarize(local_storage, cache_dir):
    write_digits(local_storage, per_class=6)
    local_storage.put_source_object("labeled/0/bad.png", b"junk")
    df, _ = _build(local_storage, cache_dir, folds=2)
    s = idx.summarize(df)
    assert s.images == 19 and s.usable == 18 and s.classes == 3
    assert s.train + s.holdout == 18
    assert s.excluded == {"unreadable": 1}
