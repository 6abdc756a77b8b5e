"""What changed in the labeled data between the champion's snapshot and a new one."""

from __future__ import annotations

import pandas as pd

from darkroom.registry import pointer
from darkroom.registry.changes import changes_since_champion, diff_snapshots


def rows(*items) -> pd.DataFrame:
    """(key, label, image_id[, status]) tuples as index rows."""
    return pd.DataFrame(
        [(k, lab, iid, *(rest or ("ok",))) for k, lab, iid, *rest in items],
        columns=["key", "label", "image_id", "status"],
    )


def test_new_removed_relabelled_and_replaced_per_class():
    old = rows(("a", "cat", "1"), ("b", "cat", "2"), ("c", "dog", "3"), ("d", "dog", "4"))
    new = rows(
        ("a", "cat", "1"),  # unchanged
        ("c", "cat", "3"),  # relabelled dog -> cat
        ("d", "dog", "9"),  # same key, other content
        ("e", "bird", "5"),  # new
        ("f", "dog", "6", "unreadable"),  # not usable: not counted
    )  # b removed
    by_class = {r["class"]: r for r in diff_snapshots(old, new)}
    assert by_class["bird"] == {
        "class": "bird", "new": 1, "removed": 0, "relabelled_in": 0, "relabelled_out": 0,
        "replaced": 0, "images": 1,
    }  # fmt: skip
    assert by_class["cat"]["removed"] == 1 and by_class["cat"]["relabelled_in"] == 1
    assert by_class["cat"]["images"] == 2
    assert by_class["dog"]["relabelled_out"] == 1 and by_class["dog"]["replaced"] == 1
    assert by_class["dog"]["images"] == 1 and by_class["dog"]["new"] == 0


def test_without_a_champion_everything_is_new():
    new = rows(("a", "cat", "1"), ("b", "dog", "2"))
    assert [(r["class"], r["new"], r["images"]) for r in diff_snapshots(None, new)] == [
        ("cat", 1, 1),
        ("dog", 1, 1),
    ]


def test_the_table_is_written_beside_the_snapshot(local_storage):
    from darkroom.data.index import write_index

    old = rows(("labeled/a/1.png", "a", "1"), ("labeled/b/2.png", "b", "2"))
    new = rows(("labeled/a/1.png", "a", "1"), ("labeled/b/3.png", "b", "3"))
    for df in (old, new):
        for col, value in (("split", "train"), ("fold", 0), ("etag", "e")):
            df[col] = value
    first = write_index(local_storage, old, ["a", "b"])["snapshot"]
    second = write_index(local_storage, new, ["a", "b"])["snapshot"]
    local_storage.write_json("models/v1/model.json", {"index_snapshot": first})
    local_storage.write_bytes("models/v1/model.safetensors", b"w")
    pointer.promote(local_storage, "v1", expected_etag=None, action="promote", reason="t")
    changes = changes_since_champion(local_storage, second)
    assert changes.since == first and changes.total["new"] == 1 and changes.total["removed"] == 1
    saved = local_storage.read_json(f"index/{second}.changes.json")
    assert saved["since"] == first and saved["classes"] == changes.rows
