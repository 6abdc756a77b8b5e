"""The watcher's tick (darkroom.watch.check_incoming): one darkroom.images.arrived event with
the count of new images, only when there are new ones; never twice for the same arrival."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest

from darkroom.layout import WATCH_STATE as STATE
from darkroom.scoring.chunks import PREDICTION_SCHEMA, write_predictions
from darkroom.scoring.watch import ARRIVED, check_incoming, resource_id
from tests.conftest import png_bytes


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, *, event, resource, payload):
        self.events.append({"event": event, "resource": resource, "payload": payload})


def add(storage, *names, value=100):
    for n in names:
        storage.put_source_object(f"incoming/{n}.png", png_bytes(value))


def crown(storage, version="v1"):
    storage.write_text("models/champion.json", json.dumps({"version": version}))


def test_no_event_without_new_images_or_without_a_champion(local_storage):
    emit = Recorder()
    assert not check_incoming(local_storage, emit).emitted  # empty incoming/
    add(local_storage, "a", "b")
    result = check_incoming(local_storage, emit)  # nothing to score them with yet
    assert not result.emitted and result.new == 2 and emit.events == []
    assert not local_storage.exists(STATE)  # they stay new until there is a champion


def test_one_event_per_tick_with_the_count_of_new_images(local_storage):
    emit = Recorder()
    crown(local_storage)
    add(local_storage, "a", "b", "c")
    local_storage.put_source_object("incoming/notes.txt", b"not an image")
    assert check_incoming(local_storage, emit).emitted
    (e,) = emit.events
    assert e["event"] == ARRIVED and e["payload"]["count"] == 3
    assert e["resource"] == {"prefect.resource.id": resource_id(local_storage)}
    assert e["resource"]["prefect.resource.id"] == f"darkroom.storage.{local_storage.uri}"
    assert sorted(e["payload"]["keys"]) == [f"incoming/{n}.png" for n in "abc"]

    assert not check_incoming(local_storage, emit).emitted  # the next tick: nothing new
    assert len(emit.events) == 1

    add(local_storage, "d", "e")
    assert check_incoming(local_storage, emit).new == 2
    assert [e["payload"]["count"] for e in emit.events] == [3, 2]


def test_a_replaced_image_is_new_and_scored_images_are_not(local_storage):
    emit = Recorder()
    crown(local_storage, "v2")
    add(local_storage, "a", "b", "c")
    # "c" was scored by an earlier model: a plain scoring run would skip it, so it is not new.
    etag_c = local_storage.etag("incoming/c.png")
    row = {
        "key": "incoming/c.png",
        "etag": etag_c,
        "label": "x",
        "confidence": 0.9,
        "topk_labels": ["x"],
        "topk_probs": [0.9],
        "model_version": "v1",
        "scored_at": pd.Timestamp.now(tz="UTC"),
        "status": "ok",
        "error": "",
    }
    frame = pd.DataFrame([{f.name: row.get(f.name) for f in PREDICTION_SCHEMA}])
    frame = pa.Table.from_pandas(frame, schema=PREDICTION_SCHEMA, preserve_index=False).to_pandas()
    write_predictions(local_storage, "v1", "chunk", frame)
    check_incoming(local_storage, emit)
    assert emit.events[-1]["payload"]["count"] == 2

    # the user replaces a.png: a new (key, etag) pair, announced again
    path = local_storage.local_path("incoming/a.png")
    path.write_bytes(png_bytes(7, size=20))
    check_incoming(local_storage, emit)
    assert emit.events[-1]["payload"] == {
        "count": 1,
        "storage": local_storage.uri,
        "keys": ["incoming/a.png"],
    }
    # the state keeps only pairs still under incoming/ (the old a.png etag is gone)
    state = json.loads(local_storage.read_text(STATE))
    assert len(state["pairs"]) == 2 and all(k != "incoming/c.png" for k, _ in state["pairs"])


def test_a_failed_emit_announces_again_next_tick(local_storage):
    crown(local_storage)
    add(local_storage, "a")

    def broken(**_):
        raise ConnectionError("api down")

    with pytest.raises(ConnectionError):
        check_incoming(local_storage, broken)
    emit = Recorder()
    check_incoming(local_storage, emit)
    assert [e["payload"]["count"] for e in emit.events] == [1]
