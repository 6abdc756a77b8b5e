"""The decode-once cache and the loaders over it: hits, misses, invalidation, atomic builds,
the size bound, refused images, the same tensors and order as the file path, worker reuse."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from darkroom.config import RetrainConfig
from darkroom.data.cache import DECODE_VERSION, DecodedCache
from darkroom.data.images import ImageDataset, ImageTooLarge, UnreadableImage, build_transform
from darkroom.ops.cores import cpu_quota, usable_cores
from darkroom.training import feed
from darkroom.training.fit import fit
from darkroom.training.records import FoldData, LoaderLimits
from darkroom.training.steps import StepOptions, make_loader, to_device
from tests.conftest import TINY, entries_on_disk, photo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")


def test_build_decodes_once_and_finds_entries_again(tmp_path, photos):
    ids, paths = photos
    cache = DecodedCache(tmp_path / "decoded", 32, 10**9)
    first = cache.build(ids, paths)
    assert first.decoded == 4 and len(entries_on_disk(cache.root)) == 4
    assert first.entries[0].endswith(f"v{DECODE_VERSION}/32/{ids[0][:2]}/{ids[0]}.npy")
    pixels = np.load(first.entries[0])
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    again = cache.build(ids, paths)
    assert again.decoded == 0 and again.entries == first.entries
    # another size is another entry; changed content is another id: both are misses
    assert DecodedCache(cache.root, 48, 10**9).build(ids[:1], paths[:1]).decoded == 1
    new_id, new_path = photo(tmp_path / "changed", 640, 480, 99)
    assert cache.build([ids[0], new_id], [paths[0], new_path]).decoded == 1
    # a truncated entry (a disk that lost its tail) is rebuilt, not read
    Path(first.entries[1]).write_bytes(Path(first.entries[1]).read_bytes()[:100])
    assert cache.build(ids, paths).decoded == 1
    assert np.load(first.entries[1]).shape == (32, 32, 3)


def test_refused_images_are_never_cached(tmp_path, photos):
    ids, paths = photos
    cache = DecodedCache(tmp_path / "decoded", 32, 10**9)
    with pytest.raises(ImageTooLarge):
        cache.build(ids[:1], paths[:1], max_pixels=640 * 480 - 1)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(UnreadableImage, match="bad.jpg"):
        cache.build(["ab" * 32], [str(bad)])
    assert not list(cache.root.rglob("*.npy")) and not list(cache.root.rglob("*.tmp"))


def test_prune_keeps_the_bound_by_last_use_but_never_what_the_build_needs(tmp_path, photos):
    ids, paths = photos
    probe = DecodedCache(tmp_path / "decoded", 32, 10**9)
    size = probe.entry_bytes
    probe.build(ids[:3], paths[:3])
    for age, image_id in enumerate(ids[:3]):  # ids[0] used most recently, ids[2] longest ago
        t = 1_000_000 - age * 1000
        os.utime(probe.entry(image_id), (t, t))
    # room for three entries: building a fourth drops the least recently used one
    cache = DecodedCache(probe.root, 32, 3 * size)
    cache.build(ids[3:], paths[3:])
    assert {p.stem for p in entries_on_disk(cache.root)} == {ids[0], ids[1], ids[3]}
    # a bound smaller than what the build needs keeps all it needs, and nothing else
    tight = DecodedCache(probe.root, 32, size)
    built = tight.build(ids[1:], paths[1:])
    assert sorted(map(str, entries_on_disk(cache.root))) == sorted(built.entries)


def _file_batch(paths, size):
    ds = ImageDataset(paths, [0] * len(paths), build_transform(size, MEAN, STD, "none"))
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_cached_tensors_equal_the_file_path_tensors(tmp_path, photos):
    ids, paths = photos
    size = 40
    entries = DecodedCache(tmp_path / "decoded", size, 10**9).build(ids, paths).entries
    data = FoldData(entries, [0] * 4, entries, [1] * 4, 2, decoded=True)
    train, val = feed.fold_loaders(data, "none", 4, 0, seed=0)
    try:
        (pixels, labels), *_ = list(val)
    finally:
        val.release()
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, size, size, 3)
    cached, _ = to_device(pixels, labels, CPU, StepOptions(mean=MEAN, std=STD))
    expected = _file_batch(paths, size)
    assert cached.shape == expected.shape == (4, 3, size, size)
    grey_level = torch.tensor(1 / (255 * np.array(STD)), dtype=torch.float32).view(1, 3, 1, 1)
    assert ((cached - expected).abs() <= grey_level).all()
    assert torch.equal(cached, expected)  # in fact the same bits: same pixels, same arithmetic
    with pytest.raises(ValueError, match="mean"):
        to_device(pixels, labels, CPU, StepOptions())


def _epoch_orders(loader, epochs=3, seed=7):
    orders = []
    for epoch in range(epochs):
        loader.generator.manual_seed(seed + epoch)  # what Trainer.run_epoch does
        orders.append([int(y) for _, labels in loader for y in labels])
    return orders


def test_shuffle_order_is_the_file_paths_and_the_workers_are_reused(tmp_path, photos):
    ids, paths = photos
    ids, paths = ids * 3, paths * 3
    labels = list(range(len(paths)))
    entries = DecodedCache(tmp_path / "decoded", 16, 10**9).build(ids, paths).entries
    files = make_loader(paths, labels, build_transform(16, MEAN, STD), 5, shuffle=True)
    expected = _epoch_orders(files)
    assert len({tuple(o) for o in expected}) == 3  # each epoch its own order
    data = FoldData(entries, labels, entries[:2], labels[:2], 12, LoaderLimits(), decoded=True)
    pids = []
    for _fold in range(2):  # two folds, one after the other, in this process
        train, val = feed.fold_loaders(data, "soft", 5, 1, seed=7)
        assert _epoch_orders(train) == expected  # with a worker, as without
        assert [int(y) for _, ys in val for y in ys] == labels[:2]
        workers = list(train.lease.loader._iterator._workers)
        pids.append([w.pid for w in workers])
        train.release()
        val.release()  # given back once, whoever gives it
    assert pids[0] == pids[1]  # the second fold ran on the first fold's worker
    feed.close_loaders()
    assert workers and not any(w.is_alive() for w in workers)


def test_num_workers_auto_resolves_from_the_cores(monkeypatch):
    for cores, workers in [(1, 0), (2, 0), (3, 2), (16, 15)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert feed.resolve_workers("auto") == workers
    assert feed.resolve_workers(3) == 3
    assert RetrainConfig().num_workers == "auto"
    with pytest.raises(ValueError, match="num_workers"):
        RetrainConfig(num_workers="many")


def test_a_fit_on_cached_pixels_trains_as_the_fit_on_files(tmp_path):
    from sklearn.datasets import load_digits

    from darkroom.cli.demo import digit_png

    digits = load_digits()
    keep = [i for i in range(300) if digits.target[i] in (0, 1, 7)][:48]
    paths, ids, labels = [], [], []
    for i in keep:
        path = tmp_path / f"d{i}.png"
        path.write_bytes(digit_png(digits.data[i], 32))
        paths.append(str(path))
        ids.append(hashlib.sha256(path.read_bytes()).hexdigest())
        labels.append([0, 1, 7].index(digits.target[i]))
    entries = DecodedCache(tmp_path / "decoded", 32, 10**9).build(ids, paths).entries
    cfg = TINY.model_copy(update={"epochs": 4, "lr": 1e-2, "batch_size": 8})
    cached = fit(FoldData(entries, labels, entries, labels, 3, decoded=True), cfg, device=CPU)
    files = fit(FoldData(paths, labels, paths, labels, 3), cfg, device=CPU)
    assert cached.history[-1]["train_loss"] < cached.history[0]["train_loss"] / 2
    assert cached.history[-1]["train_accuracy"] > 0.9
    # the same tensors in the same order: the same training
    for a, b in zip(cached.history, files.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)


def test_the_first_fold_decodes_and_the_next_folds_reuse(local_storage, cache_dir, monkeypatch):
    from darkroom.data.cache import DecodedCache
    from darkroom.data.index import read_index, rebuild_index
    from darkroom.data.sync import sync_labeled
    from darkroom.training import fold as train
    from tests.conftest import write_digits

    write_digits(local_storage, classes=("0", "1"), per_class=6)
    config = RetrainConfig(storage=local_storage.uri, cache_dir=str(cache_dir), train=TINY)
    sync_labeled(local_storage, config)
    rows, _, _ = read_index(local_storage, rebuild_index(local_storage, config, "t").snapshot)
    rows = rows[rows["split"] == "train"]
    decoded, real = [], DecodedCache._decode
    monkeypatch.setattr(DecodedCache, "_decode", lambda s, *a: decoded.append(a[0]) or real(s, *a))
    folds = [
        train._fold_data(local_storage, config, rows[rows["fold"] != k], rows[rows["fold"] == k], 2)
        for k in range(2)
    ]
    assert sorted(decoded) == sorted(rows["image_id"])  # each image once, by the first fold
    assert all(f.decoded for f in folds)
    assert sorted(folds[1].train_paths + folds[1].val_paths) == sorted(
        str(DecodedCache(cache_dir / "decoded", TINY.image_size, 1).entry(i))
        for i in rows["image_id"]
    )
    off = config.model_copy(update={"decoded_cache_gib": 0})
    plain = train._fold_data(local_storage, off, rows, rows.iloc[:0], 2)
    assert not plain.decoded and all(p.endswith(".png") for p in plain.train_paths)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "400000 100000\n"}, 4.0),  # cgroup v2, a pod's limits.cpu: 4
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),  # half a core: one, on any machine
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files (macOS, Windows)
    ],
)
def test_container_cpu_limit_caps_the_cores(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == quota
    cores = len(os.sched_getaffinity(0))
    expected = min(cores, math.ceil(quota)) if quota else cores
    assert usable_cores(tmp_path) == expected
