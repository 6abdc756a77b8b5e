"""The labeling round trip with the real `darkroom` command: retrain a champion, score what
arrived, queue images for labels, answer some of them in an export of Label Studio's JSON
format, import it, retrain: exactly the answered images join the index."""

from __future__ import annotations

import copy
import json

import pytest

from darkroom import layout
from darkroom.data.index import read_index
from tests.conftest import TINY, cli_env, run_darkroom, train_flags, write_digits
from tests.labeling_helpers import check_import_file, fixture

pytestmark = pytest.mark.slow


def _darkroom(tmp_path, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    return run_darkroom(*args, env=cli_env(tmp_path), ok=ok).stdout


def _summary(stdout: str) -> dict:
    """The JSON object `darkroom retrain` prints last."""
    return json.loads(stdout[stdout.rfind("\n{") + 1 :])


def _answered(tasks: list[dict], truth: dict[str, str]) -> list[dict]:
    """Label Studio's JSON export of ``tasks``, built from the fixture's shape: the first
    three answered with their true digit, the fourth skipped, the rest left alone."""
    shape = json.loads(fixture("export.json"))
    done, skipped = shape[0], shape[1]  # one answer; one cancelled annotation
    out = []
    for i, task in enumerate(tasks[:4]):
        exported = copy.deepcopy(skipped if i == 3 else done)
        exported["id"], exported["data"] = 100 + i, task["data"]
        if i < 3:
            result = exported["annotations"][0]["result"][0]
            result["value"]["choices"] = [truth[task["data"]["key"]]]
        out.append(exported)
    return out


def test_queue_answer_import_retrain_adds_exactly_the_answered_images(tmp_path, local_storage):
    storage, cache = local_storage, str(tmp_path / "cache")
    truth = write_digits(storage, per_class=12, incoming=40)
    for key in [
        k for k, digit in truth.items() if k.startswith("incoming/") and digit not in "012"
    ]:
        (storage.root / key).unlink()  # only digits the champion knows arrive
        del truth[key]
    arrived = sum(k.startswith("incoming/") for k in truth)
    common = ("--storage", storage.uri, "--cache-dir", cache)
    first = _summary(_darkroom(tmp_path, "retrain", *common, *train_flags(TINY)))
    if not first["promoted"]:  # one epoch on 36 images rarely clears the gate: any model will do
        _darkroom(tmp_path, "promote", first["version"], "--force", "--storage", storage.uri)
    _darkroom(tmp_path, "score", *common)
    before = set(read_index(storage).rows["key"])

    out = _darkroom(tmp_path, "label-queue", "--storage", storage.uri, "--n", "8")
    assert f"queued 8 of {arrived} scored images" in out
    (queue,) = [o.key for o in storage.list(layout.LABEL_QUEUE) if o.key.endswith(".json")]
    tasks = storage.read_json(queue)
    check_import_file(tasks, storage.read_text(queue.replace(".json", ".xml")))
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_answered(tasks, truth)))
    out = _darkroom(tmp_path, "import-labels", str(export), "--storage", storage.uri)
    assert "added 3 labels" in out and "1 skipped" in out and "0 refused" in out

    # A second queue leaves out what is now labeled and what the first one still holds.
    out = _darkroom(tmp_path, "label-queue", "--storage", storage.uri, "--n", "8")
    assert "3 already labeled, 5 in a queue still open" in out

    answered = {t["data"]["key"] for t in tasks[:3]}
    _darkroom(tmp_path, "retrain", *common, *train_flags(TINY))
    rows = read_index(storage).rows
    assert set(rows["key"]) == before | answered
    labels = rows.set_index("key").loc[sorted(answered), "label"].to_dict()
    assert labels == {k: truth[k] for k in sorted(answered)}
    # The retrain's data-changes report (beside the snapshot) counts them as new.
    changes = storage.read_json(layout.index_changes(read_index(storage).snapshot))
    assert sum(c["new"] for c in changes["classes"]) == 3
