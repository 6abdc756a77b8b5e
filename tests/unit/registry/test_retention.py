"""Retention (darkroom.registry.retention and .cleanup): on a root with 12 versions, 3
promotion records and a held lease, the plan deletes exactly the expected set, and never
anything under labeled/, incoming/ or predictions/, the labels files or the ledger."""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from darkroom import layout
from darkroom.config import CleanupConfig
from darkroom.registry import pointer
from darkroom.registry.cleanup import cleanup, report_lines, survey
from darkroom.registry.retention import plan_cleanup, size_text
from darkroom.storage import LocalStorage, lease

DAY = 24 * 3600
NOW = datetime.now(UTC)
# keep_versions 4 of 12, and the last promotion record only: every rule has work to do.
CONFIG = CleanupConfig(keep_versions=4, keep_promotions=1, keep_report_days=30)


def snap(i: int) -> str:
    return f"{i:02d}" + "ab" * 7


def v(i: int) -> str:
    """Version i's id, as registry.pointer.new_version spells it from its snapshot."""
    return pointer.new_version(snap(i), f"{i:08x}")


def put(storage: LocalStorage, key: str, size: int, age_days: float = 0) -> None:
    """A file of ``size`` bytes, last modified ``age_days`` ago."""
    data = bytes([len(key) % 251]) * size
    if key.startswith((layout.LABELED, layout.INCOMING)):
        storage.put_source_object(key, data)
    else:
        storage.write_bytes(key, data)
    t = time.time() - age_days * DAY
    os.utime(storage.local_path(key), (t, t))


def version_folder(storage: LocalStorage, i: int, age_days: float = 40) -> None:
    """A finished version: model.json (created i days after a start 13 days ago), weights, a
    decision and one finished fold."""
    created = NOW - timedelta(days=13 - i)
    meta = {"version": v(i), "created_at": created.isoformat(), "index_snapshot": snap(i)}
    storage.write_json(layout.version(v(i), "model.json"), meta)
    put(storage, layout.version(v(i), "model.safetensors"), 1000 + i, age_days)
    put(storage, layout.version(v(i), "decision.json"), 10 + i, age_days)
    put(storage, layout.fold(v(i), 0, layout.FOLD_RECORD), 20 + i, age_days)
    put(storage, layout.fold(v(i), 0, "model.safetensors"), 500 + i, age_days)
    put(storage, layout.index_snapshot(snap(i)), 300 + i, age_days)


@pytest.fixture
def root(tmp_path):
    """12 versions (v(8) unfinished, its files old), 3 promotions (v1, v3, v5: the champion),
    a scoring run that holds v2, leftover fold checkpoints, index snapshots, reports of every
    age, and the user's files, all of them old."""
    storage = LocalStorage(tmp_path / "bucket")
    for i in range(1, 13):
        if i == 8:  # no model.json: a retrain that stopped; its files are old
            put(storage, layout.fold(v(8), 0, layout.FOLD_CHECKPOINT), 700, age_days=20)
            put(storage, layout.index_snapshot(snap(8)), 308, age_days=20)
        else:
            version_folder(storage, i)
    for i, previous in ((1, None), (3, 1), (5, 3)):
        pointer.promote(
            storage,
            v(i),
            expected_etag=pointer.read_champion(storage)[1],
            action="promote",
            reason="test",
            previous=v(previous) if previous else None,
        )
    held = lease.acquire(storage, "score", ttl=300)  # a scoring run still on the old champion
    held.hold(v(2))
    # fold checkpoints: finished (v10, v2: held), unfinished (v11)
    for i in (10, 2):
        put(storage, layout.fold(v(i), 1, layout.FOLD_RECORD), 30)
        put(storage, layout.fold(v(i), 1, layout.FOLD_CHECKPOINT), 4000 + i)
    put(storage, layout.fold(v(11), 1, layout.FOLD_CHECKPOINT), 4011)
    put(storage, layout.index_snapshot(snap(13)), 313, age_days=40)  # the latest
    put(storage, layout.index_changes(snap(13)), 13, age_days=40)
    put(storage, layout.index_changes(snap(4)), 14, age_days=40)
    put(storage, layout.index_snapshot(snap(14)), 314, age_days=40)  # nobody's
    storage.write_json(layout.INDEX_LATEST, {"snapshot": snap(13)})
    put(storage, layout.quarantine("old-run"), 50, age_days=31)
    put(storage, layout.quarantine("new-run"), 51, age_days=29)
    put(storage, layout.WATCH_STATE, 52, age_days=400)
    put(storage, layout.label_issues(v(1)), 53)  # young, but its version goes
    put(storage, layout.label_issues(v(3)), 54, age_days=400)  # old, but its version stays
    put(storage, layout.label_issues("gone-version"), 55, age_days=31)
    put(storage, layout.lr_finder(snap(1), "f" * 8, "png"), 56, age_days=31)
    for key in (
        "labeled/0/a.png",
        "incoming/b.png",
        layout.predictions(v(1), "c"),
        layout.ledger_part(layout.predictions(v(1), "c")),
        *layout.LABEL_FILES,
    ):
        put(storage, key, 60, age_days=1000)
    return storage


def files_of(storage: LocalStorage, i: int) -> set[str]:
    return {o.key for o in storage.list(layout.version(v(i)))}


def expected(storage: LocalStorage) -> set[str]:
    """What the rules let go of in ``root``, spelled out."""
    versions = {k for i in (1, 4, 6, 7, 8) for k in files_of(storage, i)}
    return versions | {
        layout.label_issues(v(1)),  # with its version
        layout.fold(v(10), 1, layout.FOLD_CHECKPOINT),  # a finished fold's resume state
        *(layout.index_snapshot(snap(i)) for i in (1, 4, 6, 7, 8, 14)),
        layout.index_changes(snap(4)),
        layout.quarantine("old-run"),
        layout.label_issues("gone-version"),
        layout.lr_finder(snap(1), "f" * 8, "png"),
    }


def test_the_plan_deletes_exactly_the_expected_set_and_says_why(root):
    state = survey(root)
    plan = plan_cleanup(state, CONFIG)
    assert set(plan.keys) == expected(root) and len(plan.keys) == len(set(plan.keys))
    assert plan.kept == {
        v(5): "the champion",
        v(2): "held by a running score run",
        v(3): "named in the last 1 promotion records",
        **{v(i): "one of the 4 most recent versions" for i in (9, 10, 11, 12)},
    }
    alone = CONFIG.model_copy(update={"keep_promotions": 0})  # no record protects it
    assert plan_cleanup(state, alone).kept[v(5)] == "the champion"
    sizes = {o.key: o.size for o in root.list()}
    assert plan.bytes == sum(sizes[k] for k in expected(root))
    why = {d.key: d.reason for d in plan.deletions}
    assert why[layout.version(v(1), "model.json")].startswith("superseded")
    assert why[layout.version(v(4), "model.json")].startswith("never promoted")
    assert why[layout.fold(v(8), 0, layout.FOLD_CHECKPOINT)].startswith("unfinished")
    lines = report_lines(cleanup(root, CONFIG))
    assert f"({plan.bytes} bytes) in {len(plan.keys)} files" in lines[-1]
    v1 = [*files_of(root, 1), layout.label_issues(v(1))]
    assert f"  {v(1)}  (6 files, {size_text(sum(sizes[k] for k in v1))})" in lines


def test_the_plan_never_names_the_users_files_predictions_or_ledger(root):
    """Given the whole root's listing (not only what survey lists), and every user file
    a thousand days old."""
    everything = dataclasses.replace(survey(root), objects=list(root.list()))
    keys = plan_cleanup(everything, CleanupConfig(keep_versions=1, keep_report_days=1)).keys
    never = (layout.LABELED, layout.INCOMING, layout.PREDICTIONS, layout.LEDGER, layout.LEASES)
    assert keys and not [k for k in keys if k.startswith(never) or k in layout.LABEL_FILES]
    assert not {layout.CHAMPION, layout.INDEX_LATEST, layout.WATCH_STATE} & set(keys)
    assert not [k for k in keys if k.startswith(layout.PROMOTIONS)]


def test_a_dry_run_deletes_nothing_and_apply_deletes_the_plan(root):
    before, planned = {o.key: o.size for o in root.list()}, expected(root)
    dry = cleanup(root, CONFIG)
    assert set(dry.plan.keys) == planned
    assert not dry.applied and {o.key: o.size for o in root.list()} == before
    done = cleanup(root, CONFIG.model_copy(update={"apply": True}))
    after = {o.key: o.size for o in root.list()}
    assert set(done.deleted) == planned
    assert set(before) - set(after) == set(dry.plan.keys) and not done.failed
    assert done.bytes_freed == sum(before.values()) - sum(after.values()) == dry.plan.bytes
    assert not (root.root / layout.version(v(1))).exists()  # no empty folders left
    assert (root.root / "labeled" / "0" / "a.png").is_file()
    assert cleanup(root, CONFIG).plan.deletions == []  # nothing left to let go of


def test_a_running_retrain_keeps_its_version_and_every_index_snapshot(root):
    retrain = lease.acquire(root, "retrain", ttl=300)
    plan = plan_cleanup(survey(root), CONFIG)
    # it names no version yet: it may be resuming an unfinished one
    assert plan.kept[v(8)] == "unfinished while a retrain runs"
    assert not [k for k in plan.keys if k.startswith(layout.INDEX)]
    retrain.hold(v(6))
    plan = plan_cleanup(survey(root), CONFIG)
    assert plan.kept[v(6)] == "held by a running retrain run"
    assert not files_of(root, 6) & set(plan.keys)
    retrain.release()
    assert v(6) not in plan_cleanup(survey(root), CONFIG).kept


def test_a_lease_records_the_version_its_run_holds_and_renewing_keeps_it(tmp_path):
    storage = LocalStorage(tmp_path)
    held = lease.acquire(storage, "score", ttl=300)
    assert lease.live(storage) == [lease.Holding("score", None)]
    held.hold("v1")
    held.renew()
    assert storage.read_json(layout.lease("score"))["version"] == "v1"
    assert lease.live(storage) == [lease.Holding("score", "v1")]
    held.release()
    assert lease.live(storage) == []


def test_delete_many_refuses_the_users_files_before_deleting_anything(root):
    keep = layout.version(v(12), "decision.json")
    for refused in ("labeled/0/a.png", "incoming/b.png", *layout.LABEL_FILES):
        with pytest.raises(PermissionError, match="never"):
            root.delete_many([keep, refused])
        assert root.exists(keep) and root.exists(refused)
    assert root.delete_many([keep, "models/absent/x.json"]) == {}
    assert not root.exists(keep)
