"""Scoring: deterministic chunks, the prediction row contract, model loading checks."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from darkroom.config import ScoreConfig
from darkroom.data.images import build_transform, read_rgb
from darkroom.data.sync import sync_prefix
from darkroom.model import inference
from darkroom.model.backbone import create_model, sha256, to_bytes
from darkroom.model.inference import LoadedModel, align_probs
from darkroom.scoring import chunks as scoring
from darkroom.scoring import plan as planning
from darkroom.scoring.chunks import (
    PREDICTION_SCHEMA,
    read_predictions,
    write_predictions,
)
from darkroom.scoring.plan import chunk_id, scored_pairs
from tests.conftest import PREDICTION_COLUMNS, TINY, png_bytes, write_digits

CLASSES = ["0", "1", "2"]


@pytest.fixture
def loaded(tiny_model):
    model, meta = tiny_model
    return LoadedModel("v1", meta, model, torch.device("cpu"))


def predictions_frame(loaded, items, probs, ok, errors, topk, low_confidence=0.5):
    options = ScoreConfig(topk=topk, low_confidence=low_confidence)
    table = scoring.predictions_table(
        loaded.version, loaded.classes, items, probs, ok, errors, options
    )
    return table.to_pandas()


@pytest.fixture
def incoming(local_storage, cache_dir):
    """Three real digits and one broken file under incoming/, synced in place."""
    write_digits(local_storage, classes=("0",), per_class=1, incoming=3)
    local_storage.put_source_object("incoming/broken.png", b"not a png")
    _, manifest = sync_prefix(local_storage, "incoming/", cache_dir)
    items = sorted((k, e.etag) for k, e in manifest.items())
    paths = [manifest[k].path for k, _ in items]
    return items, paths


# ---- chunks ---------------------------------------------------------------------------------


def test_chunk_id_order_independent_and_etag_sensitive():
    pairs = [("incoming/a.png", "e1"), ("incoming/b.png", "e2"), ("incoming/c.png", "e3")]
    assert chunk_id(pairs) == chunk_id(list(reversed(pairs)))
    assert chunk_id(pairs) != chunk_id([pairs[0], pairs[1], ("incoming/c.png", "e4")])
    assert chunk_id(pairs) != chunk_id(pairs[:2])
    assert len(chunk_id(pairs)) == 20


def test_chunk_id_no_concatenation_ambiguity():
    assert chunk_id([("a", "bc")]) != chunk_id([("ab", "c")])


def test_chunks_follow_the_listing_in_order_and_are_deterministic(local_storage):
    for i in reversed(range(10)):
        local_storage.put_source_object(f"incoming/{i:02d}.png", png_bytes(value=i))
    pairs = sorted((o.key, o.etag) for o in local_storage.list("incoming/"))
    plan = planning.pending_chunks(local_storage, "v1", 4)
    assert [len(c) for c in plan.chunks] == [4, 4, 2]
    assert [p for c in plan.chunks for p in c] == pairs  # sorted, nothing lost or repeated
    assert planning.pending_chunks(local_storage, "v1", 10).chunks == [pairs]
    assert planning.pending_chunks(local_storage, "v1", 100).chunks == [pairs]
    again = planning.pending_chunks(local_storage, "v1", 4)
    assert [chunk_id(c) for c in again.chunks] == [chunk_id(c) for c in plan.chunks]


def test_no_chunks_for_an_empty_incoming(local_storage):
    plan = planning.pending_chunks(local_storage, "v1", 5)
    assert (plan.chunks, plan.incoming, plan.to_score) == ([], 0, 0)


# ---- prediction rows ------------------------------------------------------------------------


def test_prediction_rows_follow_the_contract(local_storage, loaded, incoming):
    items, paths = incoming
    probs, ok = loaded.predict_proba(paths, batch_size=2)
    assert probs.shape == (4, 3)
    assert ok.tolist() == [key != "incoming/broken.png" for key, _ in items]
    np.testing.assert_allclose(probs[ok].sum(1), 1.0, rtol=1e-5)
    df = predictions_frame(loaded, items, probs, ok, {}, topk=5)
    cid = chunk_id(items)
    key = write_predictions(local_storage, "v1", cid, df)
    assert key == f"predictions/v1/{cid}.parquet"

    back = read_predictions(local_storage, "v1")
    assert list(back.columns) == PREDICTION_COLUMNS
    assert len(back) == 4
    rows = back.set_index("key")
    assert rows.loc[[k for k, _ in items], "etag"].tolist() == [e for _, e in items]
    assert (back["model_version"] == "v1").all()
    assert str(back["scored_at"].dtype).startswith("datetime64")
    assert str(back["scored_at"].dt.tz) == "UTC"

    good = back[back["status"] == "ok"]
    assert len(good) == 3
    for r in good.itertuples():
        assert len(r.topk_labels) == len(r.topk_probs) == min(5, len(CLASSES))
        assert sorted(r.topk_labels) == CLASSES
        assert list(r.topk_probs) == sorted(r.topk_probs, reverse=True)
        assert r.label == r.topk_labels[0]
        assert r.confidence == pytest.approx(r.topk_probs[0])
        assert r.error == ""
        i = [k for k, _ in items].index(r.key)
        assert r.confidence == pytest.approx(probs[i].max())
        assert r.label == CLASSES[int(probs[i].argmax())]

    bad = rows.loc["incoming/broken.png"]
    assert bad["status"] == "unreadable"
    assert bad["error"]
    assert bad["label"] is None or pd.isna(bad["label"])
    assert pd.isna(bad["confidence"])
    assert len(bad["topk_labels"]) == 0


def test_topk_smaller_than_classes(loaded, incoming):
    items, paths = incoming
    probs, ok = loaded.predict_proba(paths)
    df = predictions_frame(loaded, items, probs, ok, {}, topk=2)
    for r in df[df["status"] == "ok"].itertuples():
        assert len(r.topk_labels) == len(r.topk_probs) == 2
        assert r.topk_probs[0] >= r.topk_probs[1]


def test_fetch_error_becomes_unreadable_with_its_message(loaded, incoming):
    items, paths = incoming
    probs, ok = loaded.predict_proba(paths)
    failed = "incoming/new-1796.png"  # decodable, but say its fetch failed
    assert ok[[k for k, _ in items].index(failed)]
    df = predictions_frame(loaded, items, probs, ok, {failed: "could not fetch"}, topk=3)
    row = df.set_index("key").loc[failed]
    assert row["status"] == "unreadable" and row["error"] == "could not fetch"
    assert pd.isna(row["label"]) and pd.isna(row["confidence"])
    assert (df["status"] == "ok").sum() == 2


def test_scored_pairs_and_folder_read(local_storage, loaded, incoming):
    items, paths = incoming
    probs, ok = loaded.predict_proba(paths)
    chunks = [items[:3], items[3:]]
    for chunk in chunks:
        pos = [items.index(p) for p in chunk]
        df = predictions_frame(loaded, chunk, probs[pos], ok[pos], {}, topk=3)
        write_predictions(local_storage, "v1", chunk_id(chunk), df)
    assert scored_pairs(local_storage, "v1") == set(items)
    assert scored_pairs(local_storage, "other") == set()
    folder = local_storage.root / "predictions" / "v1"
    assert len(list(folder.glob("*.parquet"))) == len(chunks) == 2
    whole = pd.read_parquet(folder)
    assert sorted(whole["key"]) == sorted(k for k, _ in items)
    assert list(whole.columns) == PREDICTION_COLUMNS


def test_rewriting_a_chunk_replaces_not_duplicates(local_storage, loaded, incoming):
    items, paths = incoming
    probs, ok = loaded.predict_proba(paths)
    df = predictions_frame(loaded, items, probs, ok, {}, topk=3)
    for _ in range(2):
        write_predictions(local_storage, "v1", chunk_id(items), df)
    assert len(read_predictions(local_storage, "v1")) == len(items)


def test_read_predictions_empty_has_schema(local_storage):
    df = read_predictions(local_storage, "nothing")
    assert df.empty
    assert list(df.columns) == PREDICTION_SCHEMA.names == PREDICTION_COLUMNS


def test_align_probs_by_class_name():
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]], np.float32)
    out = align_probs(probs, ["a", "b", "c"], ["c", "x", "a"])
    np.testing.assert_allclose(out, [[0.7, 0.0, 0.1], [0.1, 0.0, 0.5]])
    np.testing.assert_allclose(align_probs(probs, ["a", "b", "c"], ["a", "b", "c"]), probs)


# ---- loading a version ----------------------------------------------------------------------


def _write_version(storage, version, model, meta, weights: bytes | None = None):
    real = to_bytes(model)
    storage.write_bytes(f"models/{version}/model.safetensors", real if weights is None else weights)
    storage.write_text(
        f"models/{version}/model.json",
        json.dumps({**meta, "version": version, "sha256": sha256(real)}),
    )
    return real


def test_load_version_round_trip(local_storage, tiny_model, incoming):
    model, meta = tiny_model
    _write_version(local_storage, "good", model, meta)
    loaded = inference.load_version(local_storage, "good", "cpu")
    assert loaded.classes == CLASSES
    assert inference.load_version(local_storage, "good", "cpu") is loaded  # loaded once
    _, paths = incoming
    direct = LoadedModel("x", meta, model, torch.device("cpu")).predict_proba(paths)[0]
    np.testing.assert_allclose(loaded.predict_proba(paths)[0], direct, rtol=1e-4, atol=1e-6)


def test_load_version_refuses_tampered_weights(local_storage, tiny_model):
    model, meta = tiny_model
    real = to_bytes(model)
    tampered = bytearray(real)
    tampered[-1] ^= 0xFF
    _write_version(local_storage, "bad", model, meta, weights=bytes(tampered))
    with pytest.raises(ValueError, match="sha256"):
        inference.load_version(local_storage, "bad", "cpu")


def test_load_version_refuses_other_weights(local_storage, tiny_model):
    model, meta = tiny_model
    torch.manual_seed(1)
    other = create_model(TINY, len(CLASSES), pretrained=False)
    _write_version(local_storage, "swapped", model, meta, weights=to_bytes(other))
    with pytest.raises(ValueError, match="sha256"):
        inference.load_version(local_storage, "swapped", "cpu")


def test_chunk_of_only_unreadable_files_is_written(local_storage, loaded, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    items = [("incoming/bad1.png", "e1"), ("incoming/bad2.png", "e2")]
    probs, ok = loaded.predict_proba([str(bad), ""])
    assert not ok.any()
    df = predictions_frame(loaded, items, probs, ok, {}, topk=5)
    write_predictions(local_storage, "v1", chunk_id(items), df)
    back = read_predictions(local_storage, "v1")
    assert (back["status"] == "unreadable").all()
    assert back["label"].isna().all() and back["confidence"].isna().all()
    assert scored_pairs(local_storage, "v1") == set(items)


# ---- rows by columns, overlapped decoding, the chunk path ---------------------------------


def _rows_one_by_one(version, classes, items, probs, ok, errors, statuses, topk, low):
    """The contract's rows built the plain way, one dict per row: the reference."""
    rows = []
    for (key, etag), p, usable in zip(items, probs, ok, strict=True):
        good = bool(usable) and key not in errors
        top = sorted(range(len(classes)), key=lambda j: (-p[j], j))[: min(topk, len(classes))]
        conf = float(np.float32(p[top[0]]))
        rows.append(
            {
                "key": key,
                "etag": etag,
                "label": classes[top[0]] if good else None,
                "confidence": conf if good else None,
                "low_confidence": conf < low if good else None,
                "topk_labels": [classes[j] for j in top] if good else [],
                "topk_probs": [float(np.float32(p[j])) for j in top] if good else [],
                "model_version": version,
                "status": "ok" if good else statuses.get(key, "unreadable"),
                "error": "" if good else errors.get(key, "could not decode the image"),
                # how familiar the image is: empty without the version's reference
                "unfamiliar": None,
                "knn_distance": None,
                "embedding": None,
            }
        )
    return rows


@pytest.mark.parametrize("topk", [1, 3, 9])
def test_rows_by_columns_equal_rows_built_one_by_one(topk):
    classes = ["cat", "dog", "emu", "fox", "gnu"]
    rng = np.random.default_rng(topk)
    probs = rng.dirichlet(np.ones(5), size=7).astype(np.float32)
    probs[2] = [0.1, 0.3, 0.3, 0.2, 0.1]  # ties: the lower class index comes first
    probs[4] = 0.0  # a refused file's row of zeros
    items = [(f"incoming/{i}.png", f"e{i}") for i in range(7)]
    ok = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    errors = {"incoming/5.png": "refused: the key is not a safe relative path"}
    errors |= {"incoming/6.png": "9000x9000 pixels exceeds max_image_pixels"}
    statuses = {"incoming/6.png": "too_large"}
    options = ScoreConfig(topk=topk, low_confidence=0.4)
    table = scoring.predictions_table("v9", classes, items, probs, ok, errors, options, statuses)

    assert table.schema == PREDICTION_SCHEMA
    got = table.to_pylist()
    assert len({r.pop("scored_at") for r in got}) == 1  # one time for the whole chunk
    assert got == _rows_one_by_one("v9", classes, items, probs, ok, errors, statuses, topk, 0.4)
    assert [r["status"] for r in got] == ["ok"] * 4 + ["unreadable"] * 2 + ["too_large"]
    assert got[2]["topk_labels"] == ["dog", "emu", "fox", "cat", "gnu"][:topk]


@pytest.fixture
def scoring_files(tmp_path, incoming):
    """The incoming digits and broken file, an image over 2,000 pixels, and no file at all."""
    _, paths = incoming
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(size=48))
    return [*paths, str(big), "", *paths]


def test_overlapped_decoding_gives_the_sequential_results(loaded, scoring_files):
    runs = [
        loaded.predict(scoring_files, batch_size=2, max_pixels=2000, prefetch=n) for n in (0, 1, 3)
    ]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.probs, runs[0].probs)
        assert (run.ok.tolist(), run.status, run.errors) == (
            runs[0].ok.tolist(),
            runs[0].status,
            runs[0].errors,
        )
    broken, digits = ["unreadable"], ["ok"] * 3  # the incoming fixture, sorted
    assert runs[0].status == [*broken, *digits, "too_large", "unreadable", *broken, *digits]


def test_forward_is_the_models_own_softmax_on_a_cpu(loaded):
    images = torch.rand(5, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        before = torch.softmax(loaded.model(images).float(), 1)
    np.testing.assert_array_equal(loaded.forward(images).numpy(), before.numpy())
    assert not loaded.forward(images).requires_grad
    assert inference.run_mode(torch.device("cpu")) == inference.RunMode()
    cuda = inference.run_mode(torch.device("cuda"))
    assert (cuda.autocast, cuda.memory_format) == (torch.bfloat16, torch.channels_last)
    assert cuda.prefetch > 0 and cuda.pin_memory


def test_predict_equals_the_model_on_evaluations_own_tensors(loaded, scoring_files, tmp_path):
    """Scoring keeps pixels uint8 and normalises whole batches on the device; the result is
    the model on ``build_transform``'s per-image float tensors, to the bit on a CPU."""
    rgba = tmp_path / "rgba.png"  # alpha, and a size that needs the resize
    cv2.imwrite(str(rgba), np.random.default_rng(0).integers(0, 256, (37, 23, 4), np.uint8))
    paths = [*scoring_files, str(rgba)]
    got = loaded.predict(paths, batch_size=3, max_pixels=2000)
    meta = loaded.meta
    tf = build_transform(meta["image_size"], meta["mean"], meta["std"], "none")
    usable = [i for i, ok in enumerate(got.ok) if ok]
    assert len(usable) == 7 and got.ok[-1]
    images = torch.stack([tf(image=read_rgb(paths[i]))["image"] for i in usable])
    ds = inference.scoring_images([paths[i] for i in usable], meta["image_size"], 2000)
    pixels = torch.stack([ds[i][0] for i in range(len(usable))])
    assert pixels.dtype == torch.uint8
    normalised = inference.normalise_uint8(pixels, loaded._affine)
    torch.testing.assert_close(normalised, images, rtol=0, atol=0)  # the same input, bit for bit
    with torch.no_grad():
        want = torch.softmax(loaded.model(images).float(), 1).numpy()
    # other batch sizes may sum the convolutions in another order: a few float32 ulps
    np.testing.assert_allclose(got.probs[usable], want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_loader_workers_give_the_threads_results(loaded, scoring_files):
    threads = loaded.predict(scoring_files, batch_size=2, max_pixels=2000)
    workers = loaded.predict(scoring_files, batch_size=2, max_pixels=2000, num_workers=1)
    np.testing.assert_array_equal(workers.probs, threads.probs)
    assert (workers.ok.tolist(), workers.status) == (threads.ok.tolist(), threads.status)


def test_score_chunk_rows_are_the_models_predictions(local_storage, tiny_model, incoming):
    model, meta = tiny_model
    _write_version(local_storage, "v2", model, meta)
    local_storage.put_source_object("incoming/big.png", png_bytes(size=48))
    items = sorted((o.key, o.etag) for o in local_storage.list("incoming/"))
    config = ScoreConfig(
        storage=local_storage.uri, device="cpu", batch_size=2, max_image_pixels=2000, topk=2
    )
    result = scoring.score_chunk(local_storage, config, "v2", items)

    back = read_predictions(local_storage, "v2")
    assert result.key == f"predictions/v2/{chunk_id(items)}.parquet"
    assert back["key"].tolist() == [k for k, _ in items]
    paths = [str(local_storage.root / k) for k, _ in items]
    pred = inference.load_version(local_storage, "v2", "cpu").predict(paths, max_pixels=2000)
    statuses = dict(zip(back["key"], back["status"], strict=True))
    assert statuses.pop("incoming/big.png") == "too_large"
    assert statuses.pop("incoming/broken.png") == "unreadable"
    assert set(statuses.values()) == {"ok"}
    good = back["status"] == "ok"
    np.testing.assert_allclose(back["confidence"][good], pred.probs[good].max(1), rtol=1e-6)
    assert back["label"][good].tolist() == [CLASSES[i] for i in pred.probs[good].argmax(1)]
    assert (result.images, result.failed, result.unfetched) == (len(items), 2, 0)
    assert sum(result.per_class.values()) == good.sum()
    assert result.low_confidence == int((back["confidence"][good] < 0.5).sum())


def test_unsupported_formats_get_a_row_saying_so_other_files_none(local_storage, tiny_model):
    # A phone's .heic under incoming/ was meant to be scored: a row says why it was not (and
    # the pair counts as scored, so it is not planned every hour); a notes.txt is no image.
    model, meta = tiny_model
    _write_version(local_storage, "v3", model, meta)
    write_digits(local_storage, classes=("0",), per_class=1, incoming=2)
    local_storage.put_source_object("incoming/from phone.HEIC", b"ftypheic....")
    local_storage.put_source_object("incoming/anim.gif", b"GIF89a....")
    local_storage.put_source_object("incoming/notes.txt", b"hello")
    plan = planning.pending_chunks(local_storage, "v3", chunk_size=10)
    planned = [k for chunk in plan.chunks for k, _ in chunk]
    assert "incoming/notes.txt" not in planned and len(planned) == 4
    config = ScoreConfig(storage=local_storage.uri, device="cpu", batch_size=2)
    result = scoring.score_chunk(local_storage, config, "v3", plan.chunks[0])
    back = read_predictions(local_storage, "v3").set_index("key")
    for key in ("incoming/from phone.HEIC", "incoming/anim.gif"):
        assert back.loc[key, "status"] == "unsupported_format"
        assert "convert it to one of .jpg" in back.loc[key, "error"]
        assert pd.isna(back.loc[key, "label"])  # no label made up for it
    assert (back["status"] == "ok").sum() == 2 and result.failed == 2
    assert planning.pending_chunks(local_storage, "v3", chunk_size=10).chunks == []


def test_pending_pairs_new_or_not_scored_by_this_version(local_storage):
    for i in range(4):
        local_storage.put_source_object(f"incoming/{i}.png", png_bytes(value=i))
    pairs = sorted((o.key, o.etag) for o in local_storage.list("incoming/"))
    for version, scored in (("old", pairs[:1]), ("new", pairs[1:2])):
        ok = np.ones(len(scored), bool)
        probs = np.full((len(scored), 3), 1 / 3, np.float32)
        rows = scoring.predictions_table(version, CLASSES, scored, probs, ok, {}, ScoreConfig())
        write_predictions(local_storage, version, chunk_id(scored), rows)
    fresh = planning.pending_chunks(local_storage, "new", chunk_size=10)
    assert fresh.chunks == [pairs[2:]] and (fresh.already_scored, fresh.to_score) == (2, 2)
    again = planning.pending_chunks(local_storage, "new", chunk_size=10, rescore=True)
    assert again.chunks == [[pairs[0], *pairs[2:]]] and again.to_score == 3
