"""Retention end to end on a real root: 12 copies of a really trained version (tests/fixtures),
3 promotions and a retrain's lease. The cleanup flow and `darkroom cleanup` plan the same
deletions, `--apply` frees exactly the bytes it prints, and afterwards the champion still scores
and a rollback still finds its version."""

from __future__ import annotations

import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from darkroom import layout
from darkroom.cli.main import main
from darkroom.config import CleanupConfig, ScoreConfig
from darkroom.registry import pointer
from darkroom.storage import lease
from flows.cleanup import cleanup
from flows.score import score_new_images
from tests.conftest import write_digits

pytestmark = pytest.mark.slow
FIXTURE = (
    Path(__file__).resolve().parents[1] / "fixtures" / "version-0.1.0-flat" / "66f3b5d9-eeaac0b7"
)


def v(i: int) -> str:
    return f"{i:02d}f3b5d9-eeaac0b7"


@pytest.fixture
def root(local_storage):
    """v(1)..v(12), created a day apart; v(3), v(6), v(9) promoted in turn (v(9) is the
    champion); v(10) keeps a finished fold's checkpoint; a retrain holds v(1)."""
    base = (FIXTURE / "model.json").read_text()
    for i in range(1, 13):
        shutil.copytree(FIXTURE, local_storage.root / layout.version(v(i)))
        record = json.loads(base)
        record.update(version=v(i), created_at=f"2026-12-{i:02d}T00:00:00+00:00")
        local_storage.write_json(layout.version(v(i), "model.json"), record)
    local_storage.write_json(layout.fold(v(10), 0, layout.FOLD_RECORD), {"fold": 0})
    local_storage.write_bytes(layout.fold(v(10), 0, layout.FOLD_CHECKPOINT), b"s" * 5000)
    previous = None
    for i in (3, 6, 9):
        etag = pointer.read_champion(local_storage)[1]
        pointer.promote(
            local_storage, v(i), expected_etag=etag, action="promote", reason="test",
            previous=previous,
        )  # fmt: skip
        previous = v(i)
    held = lease.acquire(local_storage, "retrain", ttl=600)
    held.hold(v(1))
    yield local_storage
    held.release()


def scoring_lease(storage, run, timeout: float = 120) -> lease.Holding | None:
    """The live scoring lease, once it names a version (polled while ``run``, a future, has
    not finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not run.done():
        for held in lease.live(storage):
            if held.name == "score" and held.version:
                return held
        time.sleep(0.01)
    return None


def sizes(storage) -> dict[str, int]:
    return {o.key: o.size for o in storage.list()}


def test_cleanup_frees_what_it_prints_and_scoring_and_rollback_still_work(root, cache_dir, capsys):
    uri = root.uri
    write_digits(root, per_class=0, incoming=20)
    before = sizes(root)
    dry = cleanup(CleanupConfig(storage=uri, keep_versions=4))
    assert not dry["applied"] and dry["deleted"] == 0 and sizes(root) == before
    assert dry["kept_versions"] == sorted(v(i) for i in (1, 3, 6, 9, 10, 11, 12))

    assert main(["cleanup", "--storage", uri, "--keep-versions", "4"]) == 0
    printed = capsys.readouterr().out
    assert sizes(root) == before and "dry run, nothing deleted" in printed
    assert f"({dry['bytes']} bytes) in {dry['planned']} files" in printed

    assert main(["cleanup", "--storage", uri, "--keep-versions", "4", "--apply"]) == 0
    printed = capsys.readouterr().out
    after = sizes(root)
    freed = int(re.search(r"freed .* \((\d+) bytes\)", printed).group(1))
    assert freed == sum(before.values()) - sum(after.values()) == dry["bytes"] > 0
    gone = {v(i) for i in (2, 4, 5, 7, 8)}
    assert set(before) - set(after) == {
        k for k in before if layout.version_folder_of(k) in gone
    } | {layout.fold(v(10), 0, layout.FOLD_CHECKPOINT)}
    assert not (root.root / layout.version(v(2))).exists()

    config = ScoreConfig(storage=uri, cache_dir=str(cache_dir))
    with ThreadPoolExecutor(1) as pool:  # while it runs, its lease names the champion
        run = pool.submit(score_new_images, config)
        assert scoring_lease(root, run) == lease.Holding("score", v(9))
        scored = run.result(timeout=300)
    assert scored["version"] == v(9) and scored["scored"] == 20 and scored["failed"] == 0
    assert main(["rollback", "--storage", uri]) == 0
    assert pointer.read_champion(root)[0].version == v(6)
    scored = score_new_images(config, rescore=True)  # the old champion scores them all again
    assert scored["version"] == v(6) and scored["scored"] == 20 and scored["failed"] == 0
