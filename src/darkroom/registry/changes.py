"""What changed in the labeled data between the champion's index snapshot and a new one: per
class, images new, removed, relabelled and replaced (same key, other content)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from darkroom import layout
from darkroom.data.index import read_index
from darkroom.registry import pointer
from darkroom.storage import Storage

COUNTS = ("new", "removed", "relabelled_in", "relabelled_out", "replaced", "images")


@dataclass
class DataChanges:
    """Per-class counts (``rows``: one dict per class with COUNTS) between two snapshots."""

    snapshot: str
    since: str | None
    key: str
    rows: list[dict] = field(default_factory=list)

    @property
    def total(self) -> dict:
        return {c: sum(r[c] for r in self.rows) for c in COUNTS}


def diff_snapshots(old: pd.DataFrame | None, new: pd.DataFrame) -> list[dict]:
    """Per-class changes between two index snapshots' usable rows (``old`` None: all new)."""
    cur = new[new["status"] == "ok"].set_index("key")
    before = old[old["status"] == "ok"].set_index("key") if old is not None else cur.iloc[:0].copy()
    both = cur.index.intersection(before.index)
    moved = both[cur.loc[both, "label"].to_numpy() != before.loc[both, "label"].to_numpy()]
    same = both.difference(moved)
    replaced = same[cur.loc[same, "image_id"].to_numpy() != before.loc[same, "image_id"].to_numpy()]
    counts = {
        "new": cur.loc[cur.index.difference(before.index), "label"],
        "removed": before.loc[before.index.difference(cur.index), "label"],
        "relabelled_in": cur.loc[moved, "label"],
        "relabelled_out": before.loc[moved, "label"],
        "replaced": cur.loc[replaced, "label"],
        "images": cur["label"],
    }
    classes = sorted(set(cur["label"]) | set(before["label"]))
    tallies = {name: labels.value_counts() for name, labels in counts.items()}
    return [
        {"class": c, **{name: int(t.get(c, 0)) for name, t in tallies.items()}} for c in classes
    ]


def changes_since_champion(storage: Storage, snapshot: str) -> DataChanges:
    """Compares ``snapshot`` with the snapshot the champion was trained on and writes the
    table beside the new snapshot (``index/<snapshot>.changes.json``)."""
    champion, _ = pointer.read_champion(storage)
    since = None
    if champion:
        meta = storage.read_json(layout.version(champion.version, "model.json"), missing_ok=True)
        since = (meta or {}).get("index_snapshot")
    old = read_index(storage, since).rows if since else None
    changes = DataChanges(snapshot, since, layout.index_changes(snapshot))
    changes.rows = diff_snapshots(old, read_index(storage, snapshot).rows)
    storage.write_json(changes.key, {"snapshot": snapshot, "since": since, "classes": changes.rows})
    return changes
