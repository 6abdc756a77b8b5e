"""Images under incoming/ that the labels file labels (people's answers, appended by
import-labels) join the index, and the index's change report counts them as new."""

from __future__ import annotations

import pandas as pd

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data.index import read_index, rebuild_index
from darkroom.data.labels import parse_labels
from darkroom.data.sync import sync_labeled
from darkroom.registry.changes import diff_snapshots
from tests.conftest import TINY, write_digits


def _index(storage, cache_dir):
    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache_dir), device="cpu", train=TINY)
    sync_labeled(storage, config)
    return rebuild_index(storage, config, "run")


def test_labeled_incoming_images_join_the_index_as_new(local_storage, cache_dir):
    written = write_digits(local_storage, per_class=6, incoming=20)
    incoming = sorted(k for k in written if k.startswith(layout.INCOMING) and written[k] in "012")
    before = _index(local_storage, cache_dir)
    old = read_index(local_storage, before.snapshot).rows
    assert not old["key"].str.startswith(layout.INCOMING).any()  # unlabeled: not indexed

    answered = {k: written[k] for k in incoming[:3]}
    labels = pd.DataFrame(
        {"key": [*answered, "incoming/gone.png"], "label": [*answered.values(), "1"]}
    )
    local_storage.write_parquet("labels.parquet", labels)
    after = _index(local_storage, cache_dir)
    new = read_index(local_storage, after.snapshot).rows
    assert set(new["key"]) == set(old["key"]) | set(answered)
    rows = new.set_index("key").loc[list(answered)]
    assert rows["label"].to_dict() == answered
    assert rows["image_id"].str.len().eq(64).all() and set(rows["split"]) <= {"train", "holdout"}
    quarantine = local_storage.read_parquet(after.quarantine).set_index("key")
    assert quarantine.loc["incoming/gone.png", "status"] == "missing_object"
    assert "no such object under incoming/" in quarantine.loc["incoming/gone.png", "error"]
    changes = {r["class"]: r["new"] for r in diff_snapshots(old, new)}
    assert sum(changes.values()) == 3
    assert changes == pd.Series(answered).value_counts().reindex(changes, fill_value=0).to_dict()


def test_labels_file_keys_under_incoming_keep_their_prefix():
    file = parse_labels(pd.DataFrame({"key": ["incoming/a.png", "cat/b.png"], "label": "x"}), "f")
    assert set(file.labels) == {"incoming/a.png", "labeled/cat/b.png"}
    assert file.keys_under(layout.INCOMING) == ["incoming/a.png"]
