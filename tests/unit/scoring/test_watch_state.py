"""The watcher's state is bounded: it keeps only the announced pairs still waiting to be
scored, so it stays the same size across rounds of arrivals that were scored, and the watcher
learns what was scored from the ledger, not by reading the predictions."""

from __future__ import annotations

import json

import numpy as np

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.scoring import chunks as scoring
from darkroom.scoring.chunks import write_predictions
from darkroom.scoring.plan import chunk_id, pending_chunks
from darkroom.scoring.watch import check_incoming, read_announced
from darkroom.storage import LocalStorage
from tests.conftest import png_bytes


class CountingStorage(LocalStorage):
    """A local root that counts the predictions files it reads."""

    prediction_reads = 0

    def read_bytes(self, key: str) -> bytes:
        self.prediction_reads += key.startswith(layout.PREDICTIONS)
        return super().read_bytes(key)


def events():
    sent = []
    return sent, lambda **event: sent.append(event["payload"]["count"])


def score_pending(storage, version: str) -> int:
    """What a scoring run writes: a predictions file (and its ledger part) per chunk."""
    plan = pending_chunks(storage, version, chunk_size=3)
    for chunk in plan.chunks:
        probs = np.full((len(chunk), 2), 0.5, np.float32)
        ok = np.ones(len(chunk), bool)
        rows = scoring.predictions_table(version, ["a", "b"], chunk, probs, ok, {}, ScoreConfig())
        write_predictions(storage, version, chunk_id(chunk), rows)
    return plan.to_score


def test_the_state_stays_the_same_size_across_ten_rounds_of_scored_arrivals(tmp_path):
    storage = CountingStorage(tmp_path / "bucket")
    storage.write_json(layout.CHAMPION, {"version": "v1"})
    sent, emit = events()
    sizes = []
    for r in range(10):
        arrivals = [f"incoming/r{r:02d}-{i}.png" for i in range(5)]
        for key in arrivals:
            storage.put_source_object(key, png_bytes(value=7))
        assert check_incoming(storage, emit).emitted
        state = storage.read_bytes(layout.WATCH_STATE)
        assert sorted(k for k, _ in json.loads(state)["pairs"]) == arrivals  # this round only
        sizes.append(len(state))
        assert score_pending(storage, "v1") == 5
    assert sent == [5] * 10
    assert len(set(sizes)) == 1, sizes
    result = check_incoming(storage, emit)  # everything scored: the state empties
    assert not result.emitted and result.scored == 50 and result.new == 0
    assert read_announced(storage) == set()
    assert storage.prediction_reads == 0  # the ledger told it what was scored


def test_an_old_ever_growing_state_is_cut_down_on_the_next_tick(local_storage):
    local_storage.write_json(layout.CHAMPION, {"version": "v1"})
    gone = [[f"incoming/old-{i}.png", "e"] for i in range(1000)]
    local_storage.write_json(layout.WATCH_STATE, {"updated_at": "then", "pairs": gone})
    local_storage.put_source_object("incoming/a.png", png_bytes(value=1))
    sent, emit = events()
    check_incoming(local_storage, emit)
    assert sent == [1]
    assert [k for k, _ in read_announced(local_storage)] == ["incoming/a.png"]
