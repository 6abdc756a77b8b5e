"""A remote chunk is fetched slice by slice, the next slice downloading while this one is
scored: its rows are the rows of the same images scored in place from a local root."""

from __future__ import annotations

import pytest
import torch

from darkroom.config import ScoreConfig
from darkroom.model.backbone import create_model, mean_std, sha256, to_bytes
from darkroom.scoring import chunks
from darkroom.storage import LocalStorage, open_storage
from darkroom.storage.s3 import S3Storage
from tests.conftest import TINY, write_digits

pytestmark = [pytest.mark.s3, pytest.mark.slow]

LOST = "incoming/new-1795.png"  # in the second slice: broken, 1788..1794 | 1795, 1796


def _write(storage, weights: bytes, meta: dict) -> None:
    write_digits(storage, classes=("0",), per_class=1, incoming=9)
    storage.put_source_object("incoming/broken.png", b"not a png")
    storage.write_bytes("models/v1/model.safetensors", weights)
    storage.write_json("models/v1/model.json", {**meta, "sha256": sha256(weights)})


def _rows(storage) -> dict:
    df = chunks.read_predictions(storage, "v1").set_index("key")
    df["topk_labels"] = df["topk_labels"].map(list)
    df["topk_probs"] = df["topk_probs"].map(list)
    return df[["label", "confidence", "topk_labels", "topk_probs", "status"]].to_dict("index")


def test_a_chunk_fetched_in_slices_scores_as_in_place(s3_faulty, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model(TINY, 2, pretrained=False).eval()
    mean, std = mean_std(model)
    meta = {"version": "v1", "classes": ["0", "1"], "image_size": TINY.image_size}
    meta |= {"mean": mean, "std": std, "train_config": TINY.model_dump(mode="json")}
    remote = S3Storage(s3_faulty["bucket"], s3_faulty["prefix"], client=s3_faulty["client"])
    local = LocalStorage(tmp_path / "local")
    for storage in (remote, local):
        _write(storage, to_bytes(model), meta)
    s3_faulty["proxy"].fail_keys = {f"{s3_faulty['prefix']}/{LOST}": 500}
    slices = []
    fetch = chunks.fetch_objects
    monkeypatch.setattr(
        chunks,
        "fetch_objects",
        lambda st, objs, *a: slices.append(len(objs)) or fetch(st, objs, *a),
    )

    storage, cache = open_storage(s3_faulty["uri"]), tmp_path / "cache"
    config = ScoreConfig(storage=storage.uri, cache_dir=str(cache), device="cpu", batch_size=2)
    items = sorted((o.key, o.etag) for o in storage.list("incoming/"))
    result = chunks.score_chunk(storage, config, "v1", items)
    assert slices == [4 * 2, 2]  # FETCH_SLICE_BATCHES batches of 2, then the rest
    assert (result.images, result.failed, result.unfetched) == (9, 1, 1)
    assert list(result.unfetched_reasons) == [LOST]
    assert not [p for p in cache.rglob("*") if p.is_file() and "incoming" in p.parts]

    in_place = [(o.key, o.etag) for o in local.list("incoming/") if o.key != LOST]
    chunks.score_chunk(local, config.model_copy(update={"storage": local.uri}), "v1", in_place)
    got, want = _rows(storage), _rows(local)
    assert sorted(got) == sorted(k for k, _ in in_place)
    assert got["incoming/broken.png"]["status"] == "unreadable"
    for key, row in want.items():
        assert got[key].pop("confidence") == pytest.approx(row.pop("confidence"), nan_ok=True)
        assert got[key] == row, key
