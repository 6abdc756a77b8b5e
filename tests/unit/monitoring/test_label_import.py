"""import-labels on a real local root: each Label Studio export of the fixtures, refusals (unknown
images, new classes, disagreements, conflicts with a label already given), the labels file it
appends to, and the conditional write that keeps a concurrent writer's rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from darkroom import layout
from darkroom.cli import main as cli
from darkroom.data.labels import read_labels
from darkroom.monitoring.answers import append, import_labels, labels_file
from darkroom.storage import PreconditionFailed
from tests.labeling_helpers import fixture, make_champion, put_images

FIXTURE_KEYS = [f"incoming/2026/{n}.jpg" for n in "abcd"]


@pytest.fixture
def root(local_storage):
    make_champion(local_storage)
    put_images(local_storage, FIXTURE_KEYS)
    return local_storage


def test_the_json_export_adds_the_one_answer_and_reports_the_disagreement(root):
    r = import_labels(root, fixture("export.json", root.uri), "export.json")
    assert r.added == {"incoming/2026/a.jpg": "dog"}
    assert r.skipped == ["incoming/2026/b.jpg"]
    assert r.disagreements == {"incoming/2026/c.jpg": ["cat", "fox"]}
    assert r.refused == 1 and r.written
    assert read_labels(root).labels == {"incoming/2026/a.jpg": "dog"}  # d: never answered
    rows = root.read_parquet(layout.LABELS_APPENDED)
    assert rows[["key", "label", "source"]].values.tolist() == [
        ["incoming/2026/a.jpg", "dog", "export.json"]
    ]


@pytest.mark.parametrize("name", ["export-min.json", "export.csv"])
def test_the_min_and_csv_exports_give_the_same_labels(root, name):
    r = import_labels(root, fixture(name, root.uri), name)
    assert r.added == {"incoming/2026/a.jpg": "dog"}
    assert r.disagreements == {"incoming/2026/c.jpg": ["cat", "fox"]}
    assert read_labels(root).labels == {"incoming/2026/a.jpg": "dog"}


def test_importing_again_changes_nothing(root):
    import_labels(root, fixture("export.json", root.uri), "export.json")
    before = root.read_bytes(layout.LABELS_APPENDED)
    r = import_labels(root, fixture("export.json", root.uri), "export.json")
    assert r.added == {} and r.unchanged == ["incoming/2026/a.jpg"] and not r.written
    assert root.read_bytes(layout.LABELS_APPENDED) == before


def test_a_class_the_champion_does_not_know_needs_allow_new_classes(root):
    export = b"key,label\nincoming/2026/a.jpg,wolf\nincoming/2026/d.jpg,fox\n"
    r = import_labels(root, export, "x.csv")
    assert r.new_classes == {"incoming/2026/a.jpg": "wolf"} and r.refused == 1
    assert read_labels(root).labels == {"incoming/2026/d.jpg": "fox"}
    r = import_labels(root, export, "x.csv", allow_new_classes=True)
    assert r.added == {"incoming/2026/a.jpg": "wolf"} and r.refused == 0
    assert read_labels(root).labels["incoming/2026/a.jpg"] == "wolf"


def test_an_answer_never_overwrites_a_label_already_given(root):
    root.write_csv("labels.csv", pd.DataFrame({"key": ["incoming/2026/a.jpg"], "label": ["cat"]}))
    put_images(root, ["labeled/fox/f.png"])
    export = b"key,label\nincoming/2026/a.jpg,dog\nlabeled/fox/f.png,cat\n"
    before = root.read_bytes("labels.csv")
    r = import_labels(root, export, "x.csv")
    assert r.conflicts == {
        "incoming/2026/a.jpg": ("cat", "dog"),  # the labels file's
        "labeled/fox/f.png": ("fox", "cat"),  # the class folder's
    }
    assert r.added == {} and not r.written and r.refused == 2
    assert root.read_bytes("labels.csv") == before


def test_images_the_root_does_not_have_are_reported(root):
    export = json.dumps(
        [
            {"data": {"image": root.url("incoming/gone.jpg")}, "annotations": [_says("cat")]},
            {
                "data": {"image": "s3://elsewhere/incoming/2026/a.jpg"},
                "annotations": [_says("cat")],
            },
            {"data": {"key": "models/champion.json", "image": ""}, "annotations": [_says("cat")]},
            {"data": {"key": "../escape.jpg", "image": ""}, "annotations": [_says("cat")]},
        ]
    ).encode()
    r = import_labels(root, export, "export.json")
    assert set(r.unknown) == {
        root.url("incoming/gone.jpg"),
        "s3://elsewhere/incoming/2026/a.jpg",
        "models/champion.json",
        "../escape.jpg",
    }
    assert "no such object" in r.unknown[root.url("incoming/gone.jpg")]
    assert r.added == {} and not root.exists(layout.LABELS_APPENDED)


def _says(label: str) -> dict:
    result = [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    ]
    return {"result": result, "was_cancelled": False}


def test_a_labels_csv_gets_the_rows_in_its_own_columns_and_keeps_its_bytes(root):
    root.write_text("labels.csv", "label,key,note\ncat,incoming/2026/d.jpg,by hand")  # no \n
    before = root.read_bytes("labels.csv")
    r = import_labels(root, b"key,label\nincoming/2026/a.jpg,dog\n", "x.csv")
    assert r.labels_file == root.url("labels.csv") and not root.exists(layout.LABELS_APPENDED)
    after = root.read_bytes("labels.csv")
    assert after == before + b"\ndog,incoming/2026/a.jpg,\n"
    assert read_labels(root).labels == {"incoming/2026/d.jpg": "cat", "incoming/2026/a.jpg": "dog"}


def test_a_parquet_of_whole_number_labels_gets_whole_numbers(local_storage):
    make_champion(local_storage, classes=("1", "2"))
    put_images(local_storage, ["incoming/x.png", "incoming/y.png"])
    local_storage.write_parquet(
        "labels.parquet", pd.DataFrame({"key": ["incoming/x.png"], "label": [1]})
    )
    import_labels(local_storage, b"key,label\nincoming/y.png,2\n", "x.csv")
    assert read_labels(local_storage).labels == {"incoming/x.png": "1", "incoming/y.png": "2"}


def test_a_dry_run_writes_nothing(root):
    r = import_labels(root, fixture("export.json", root.uri), "export.json", dry_run=True)
    assert r.added == {"incoming/2026/a.jpg": "dog"} and not r.written
    assert not root.exists(layout.LABELS_APPENDED)


def test_a_concurrent_writer_is_never_overwritten(root):
    import_labels(root, b"key,label\nincoming/2026/d.jpg,fox\n", "first.csv")
    name, etag = labels_file(root)
    # Another import appends between this one's read and its write...
    import_labels(root, b"key,label\nincoming/2026/b.jpg,dog\n", "second.csv")
    with pytest.raises(PreconditionFailed):  # ... so the stale write loses, and changes nothing
        append(root, name, etag, {"incoming/2026/a.jpg": "dog"}, "third.csv")
    assert read_labels(root).labels == {"incoming/2026/d.jpg": "fox", "incoming/2026/b.jpg": "dog"}


def test_the_command_reports_and_exits_1_when_an_answer_was_refused(root, tmp_path, capsys):
    path = tmp_path / "export.json"
    path.write_bytes(fixture("export.json", root.uri))
    assert cli.main(["import-labels", str(path), "--storage", root.uri]) == 1
    out = capsys.readouterr().out
    assert "added 1 labels" in out and "1 skipped" in out and "1 refused" in out
    assert "people disagree: incoming/2026/c.jpg: 'cat' vs 'fox'" in out
    path.write_bytes(b"key,label\nincoming/2026/d.jpg,fox\n")
    assert cli.main(["import-labels", str(path), "--storage", root.uri, "--dry-run"]) == 0
    assert "would add 1 labels" in capsys.readouterr().out
    path.write_bytes(b"file,class\n")
    assert cli.main(["import-labels", str(path), "--storage", root.uri]) == 1
    assert "key,label" in capsys.readouterr().err
