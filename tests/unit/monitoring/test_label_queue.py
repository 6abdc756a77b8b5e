"""The labeling queue on a real local root: the champion's prediction rows in, the three files
out (a Label Studio import file that matches its labeling config, and a table), leaving out
images already labeled or still queued, with and without embeddings in the rows."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from darkroom import layout
from darkroom.cli import main as cli
from darkroom.config import LabelQueueConfig
from darkroom.monitoring.labeling import build_queue
from darkroom.monitoring.queue import margin
from tests.labeling_helpers import check_import_file, make_champion, put_images, write_predictions

KEYS = [f"incoming/{i:02d}.png" for i in range(20)]


def _probs(i: int) -> list[float]:
    """Image i's probabilities: the higher i, the closer its two likeliest classes."""
    top = 0.95 - 0.02 * i
    return [top, 1.0 - top - 0.01, 0.01]


@pytest.fixture
def root(local_storage):
    make_champion(local_storage)
    put_images(local_storage, KEYS)
    return local_storage


def _config(storage, **kw) -> LabelQueueConfig:
    return LabelQueueConfig(storage=storage.uri, **kw)


def test_the_queue_files_are_a_label_studio_import_of_the_most_uncertain(root):
    write_predictions(root, "v1", {k: _probs(i) for i, k in enumerate(KEYS)})
    r = build_queue(root, _config(root, n=5, random_share=0.2))
    assert r.queued == 5 and r.by_reason == {"uncertain": 4, "random": 1} and not r.diversity
    tasks = root.read_json(r.files["json"])
    check_import_file(tasks, root.read_text(r.files["xml"]))
    keys = [t["data"]["key"] for t in tasks]
    # No embeddings: the uncertain picks are the four closest calls, most uncertain first,
    # among the images the random draw left.
    assert keys[:4] == [k for k in reversed(KEYS) if k != keys[4]][:4]
    assert all(t["data"]["image"] == root.url(t["data"]["key"]) for t in tasks)
    assert {t["predictions"][0]["model_version"] for t in tasks} == {"v1"}
    first = tasks[0]["predictions"][0]
    assert first["score"] == pytest.approx(_probs(KEYS.index(keys[0]))[0], abs=1e-6)
    assert first["result"][0]["value"]["choices"] == ["cat"]
    rows = list(csv.DictReader(io.StringIO(root.read_text(r.files["csv"]))))
    assert [row["key"] for row in rows] == keys
    p = _probs(KEYS.index(keys[0]))
    expected = 1 - (p[0] - p[1])
    assert rows[0]["why"] == f"uncertain (margin {expected:.3f})" and rows[4]["why"] == "random"
    assert [r.files[e] for e in ("json", "csv", "xml")] == [
        layout.label_queue(layout.label_queue_time(r.files["json"]), e)
        for e in ("json", "csv", "xml")
    ]


def test_with_embeddings_near_copies_do_not_fill_the_queue(root):
    # The six most uncertain images are copies of one point; the rest lie far apart.
    emb = {k: [0.0, 0.0] if i >= 14 else [float(i), 10.0 * i] for i, k in enumerate(KEYS)}
    write_predictions(root, "v1", {k: _probs(i) for i, k in enumerate(KEYS)}, embeddings=emb)
    r = build_queue(root, _config(root, n=4, random_share=0.0))
    assert r.diversity and r.by_reason == {"uncertain": 4}
    keys = [t["data"]["key"] for t in root.read_json(r.files["json"])]
    assert keys[0] == KEYS[19]  # the most uncertain first
    assert len([k for k in keys if KEYS.index(k) >= 14]) == 1  # one of the copies, not four


def test_labeled_and_queued_images_are_left_out_until_the_queue_expires(root):
    write_predictions(root, "v1", {k: _probs(i) for i, k in enumerate(KEYS)})
    root.write_parquet("labels.parquet", pd.DataFrame({"key": KEYS[15:], "label": "dog"}))
    now = datetime(2026, 12, 1, tzinfo=UTC)
    first = build_queue(root, _config(root, n=5, random_share=0.0), now=now)
    assert first.already_labeled == 5 and first.candidates == 15
    picked = {t["data"]["key"] for t in root.read_json(first.files["json"])}
    assert picked == set(KEYS[10:15]) and picked.isdisjoint(KEYS[15:])
    second = build_queue(root, _config(root, n=5, random_share=0.0), now=now + timedelta(hours=1))
    assert second.already_queued == 5 and second.candidates == 10
    assert picked.isdisjoint(t["data"]["key"] for t in root.read_json(second.files["json"]))
    later = now + timedelta(seconds=LabelQueueConfig().url_expiry_seconds + 1)
    third = build_queue(root, _config(root, n=5, random_share=0.0), now=later)
    assert third.already_queued == 5  # the second queue's; the first one's links are dead
    assert {t["data"]["key"] for t in root.read_json(third.files["json"])} == picked


def test_only_the_newest_ok_row_of_an_unchanged_image_is_queued(root):
    write_predictions(root, "v1", {k: _probs(i) for i, k in enumerate(KEYS[:3])})
    # KEYS[3] changed after it was scored, KEYS[4] left incoming/: their rows are stale.
    write_predictions(root, "v1", {KEYS[3]: _probs(3), KEYS[4]: _probs(4)}, chunk="c2",
                      etags={KEYS[3]: "old", KEYS[4]: "gone"})  # fmt: skip
    r = build_queue(root, _config(root, n=10, random_share=0.0))
    assert sorted(t["data"]["key"] for t in root.read_json(r.files["json"])) == KEYS[:3]


def test_entropy_sees_the_mass_the_top_k_leaves(root):
    # Same top two, so the same margin; the second image spreads the rest over more classes.
    classes = [str(c) for c in range(6)]
    make_champion(root, classes=classes)
    write_predictions(root, "v1", {KEYS[0]: [0.5, 0.3, 0.2, 0, 0, 0],
                                   KEYS[1]: [0.5, 0.3, 0.05, 0.05, 0.05, 0.05]},
                      classes=classes)  # fmt: skip
    rows = root.read_parquet(layout.predictions("v1", "c1"))
    rows["topk_labels"] = rows["topk_labels"].map(lambda v: list(v[:3]))  # what top-3 keeps
    rows["topk_probs"] = rows["topk_probs"].map(lambda v: list(v[:3]))
    root.write_parquet(layout.predictions("v1", "c1"), rows)
    r = build_queue(root, _config(root, n=1, random_share=0.0, strategy="entropy"))
    assert [t["data"]["key"] for t in root.read_json(r.files["json"])] == [KEYS[1]]
    assert margin(np.array([[0.5, 0.3, 0.2]]))[0] == margin(np.array([[0.5, 0.3, 0.05]]))[0]


def test_nothing_waiting_writes_nothing_and_no_champion_says_so(root, local_storage, capsys):
    r = build_queue(root, _config(root))
    assert r.queued == 0 and r.files == {} and not list(root.list(layout.LABEL_QUEUE))
    assert cli.main(["label-queue", "--storage", root.uri]) == 0
    assert "nothing to queue" in capsys.readouterr().out
    root.delete(layout.CHAMPION)
    assert cli.main(["label-queue", "--storage", root.uri]) == 1
    assert "no champion" in capsys.readouterr().err


def test_the_command_says_where_the_files_are(root, capsys):
    write_predictions(root, "v1", {k: _probs(i) for i, k in enumerate(KEYS)})
    assert cli.main(["label-queue", "--storage", root.uri, "--n", "10"]) == 0
    out = capsys.readouterr().out
    assert "queued 10 of 20 scored images of v1: 9 uncertain, 1 random" in out
    assert "diversity off" in out and "storage URI" in out
    (key,) = [o.key for o in root.list(layout.LABEL_QUEUE) if o.key.endswith(".json")]
    assert f"Label Studio import file: {root.url(key)}" in out
