"""Training that starts processes: a fold on two processes (killed and resumed, a rank that
fails, a launched process that dies with its parent), the throughput benchmark without a GPU,
and two processes building the decode-once cache at once. The in-process parts of training
are tested in tests/unit/training."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from darkroom.config import RetrainConfig
from darkroom.data.cache import DecodedCache
from darkroom.data.fetch import local_paths
from darkroom.data.images import build_transform
from darkroom.data.index import read_index, rebuild_index
from darkroom.data.sync import sync_labeled
from darkroom.model.backbone import create_model
from darkroom.training import fold as train
from darkroom.training.steps import NonFiniteLoss, make_loader, predict_proba
from tests.conftest import TINY, entries_on_disk, write_digits

REPO = Path(__file__).resolve().parents[2]


FOLD = "models/v1/folds/0/"


# The fold's process, as a Prefect task runs it: the core stage, which starts the launcher.
TRAIN_FOLD = """
import sys
from darkroom.config import RetrainConfig
from darkroom.storage import open_storage
from darkroom.training.fold import train_fold
config = RetrainConfig.model_validate_json(sys.argv[1])
train_fold(open_storage(config.storage), config, sys.argv[2], "v1", 0)
"""


@pytest.fixture
def indexed_on_two_processes(local_storage, tmp_path, monkeypatch):
    """72 digits in 3 classes, indexed into 2 folds; a fold on 2 CPU processes, a checkpoint
    after every epoch. The fold's processes keep their run folder under tmp_path/tmp, so that
    their command lines name it. Returns (storage, config, snapshot)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # for the fold's processes
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # for this one's
    (tmp_path / "tmp").mkdir()
    write_digits(local_storage, classes=("0", "1", "2"), per_class=24)
    config = RetrainConfig(
        storage=local_storage.uri,
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        devices_per_fold=2,
        checkpoint_every_seconds=0,
        train=TINY.model_copy(update={"epochs": 8, "batch_size": 8}),
    )
    sync_labeled(local_storage, config)
    return local_storage, config, rebuild_index(local_storage, config, "test").snapshot


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, ValueError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def _wait_until(done, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _val_loader(storage, config, snapshot, summary):
    """(a loader, the rows) of fold 0's validation images: the synced files through the
    recipe's transform, not the decode-once cache the ranks read."""
    rows, _, _ = read_index(storage, snapshot)
    val = rows[(rows["split"] == "train") & (rows["fold"] == 0)]
    paths = local_paths(storage, val, config.cache_path(storage.uri))
    tf = build_transform(config.train.image_size, summary.mean, summary.std, "none")
    return make_loader(paths, val["class_index"].tolist(), tf, 16, shuffle=False), val


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_fold_on_two_processes_resumes_after_a_kill(indexed_on_two_processes, tmp_path):
    storage, config, snapshot = indexed_on_two_processes
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_FOLD, config.model_dump_json(), snapshot],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_dirs = str(tmp_path / "tmp")
    try:
        _wait_until(lambda: storage.exists(FOLD + "checkpoint.pt"), "no checkpoint was written")
        assert len(_processes_naming(run_dirs)) >= 3  # the launcher and two ranks
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the fold's process and the launcher
        proc.wait()
    # The ranks (torchrun starts them in sessions of their own) die with their launcher.
    _wait_until(lambda: not _processes_naming(run_dirs), "a rank outlived the killed fold", 60)
    assert not storage.exists(FOLD + "fold.json")
    saved = torch.load(io.BytesIO(storage.read_bytes(FOLD + "checkpoint.pt")), weights_only=True)
    assert not saved["final"] and "optimizer" in saved  # mid-fold: the whole resume state
    assert saved["epoch"] < config.train.epochs - 1
    (left,) = (tmp_path / "tmp").glob("darkroom-fold-*")  # the killed fold's plan and weights
    assert left.name.startswith(f"darkroom-fold-{proc.pid}-")

    summary = train.train_fold(storage, config, snapshot, "v1", 0)

    assert not list((tmp_path / "tmp").glob("darkroom-fold-*"))  # swept by the next fold

    assert summary.resumed_from_epoch == saved["epoch"] + 1 >= 1
    record = storage.read_json(FOLD + "fold.json")
    assert [h["epoch"] for h in record["history"]] == list(range(config.train.epochs))
    assert not storage.exists(FOLD + "checkpoint.pt")
    # Two processes trained, each a different half of the fold's training rows.
    ranks = summary.ranks
    assert [r["rank"] for r in ranks] == [0, 1] and record["ranks"] == ranks
    assert len({r["pid"] for r in ranks} | {os.getpid()}) == 3
    half = math.ceil(summary.train_images / 2)
    assert [r["images"] for r in ranks] == [half, half]
    assert ranks[0]["items_digest"] != ranks[1]["items_digest"]
    assert summary.device == "cpu,cpu"
    # The weights are the plain model's: one process loads them, and predicts exactly the
    # out-of-fold probabilities the two ranks gathered.
    model = create_model(config.train, 3, pretrained=False)
    model.load_state_dict(load_safetensors(storage.read_bytes(FOLD + "model.safetensors")))
    loader, val = _val_loader(storage, config, snapshot, summary)
    probs, _ = predict_proba(model, loader, torch.device("cpu"))
    oof = storage.read_parquet(FOLD + "oof.parquet")
    assert oof["key"].tolist() == val["key"].tolist()
    np.testing.assert_allclose(probs, np.stack(oof["probs"].to_numpy()), atol=1e-5)


@pytest.mark.slow
def test_a_rank_that_fails_fails_the_fold_with_its_error(indexed_on_two_processes):
    storage, config, snapshot = indexed_on_two_processes
    diverges = config.model_copy(
        update={"train": config.train.model_copy(update={"lr": 1e30, "lr_min": 1e29})}
    )
    with pytest.raises(NonFiniteLoss, match=r"rank \d of 2 failed: NonFiniteLoss: .*lower the lr"):
        train.train_fold(storage, diverges, snapshot, "v1", 0)
    assert not storage.exists(FOLD + "fold.json")  # nothing half-written is ever used


# A process that starts a child which dies with it (darkroom.training.rank's launcher and ranks).
PARENT = """
import os, subprocess, sys
child = "from darkroom.training.rank import _die_with_parent; _die_with_parent('DARKROOM_FOLD_PID');"
child += "import os, pathlib, time; p = pathlib.Path(sys.argv[1]); t = p.with_suffix('.tmp');"
child += "t.write_text(str(os.getpid())); t.rename(p);"
child += "time.sleep(600)"
env = {**os.environ, "DARKROOM_FOLD_PID": str(os.getpid())}
subprocess.run([sys.executable, "-c", "import sys;" + child, sys.argv[1]], env=env)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG, /proc")
def test_a_launched_process_dies_with_the_process_that_started_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pid_file)], cwd=REPO)
    try:
        _wait_until(pid_file.exists, "the child never started", 120)
        child = int(pid_file.read_text())
        assert _alive(child)
    finally:
        parent.kill()  # SIGKILL: the parent can do nothing for its child
        parent.wait()
    try:
        _wait_until(lambda: not _alive(child), "the child outlived its parent", 60)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_benchmark_exits_cleanly_without_a_gpu(tmp_path):
    script = REPO / "benchmarks" / "train_throughput.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "no CUDA GPU" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_two_processes_build_the_same_entries_at_once(tmp_path, photos):
    ids, paths = photos
    ids, paths = ids * 4, paths * 4  # the same images again: both processes race on each
    code = textwrap.dedent(f"""
        from darkroom.data.cache import DecodedCache
        DecodedCache({str(tmp_path / "decoded")!r}, 32, 10**9).build({ids!r}, {paths!r}, threads=2)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = DecodedCache(tmp_path / "decoded", 32, 10**9)
    assert len(entries_on_disk(cache.root)) == 4
    assert not list(cache.root.rglob("*.tmp"))
    alone = DecodedCache(tmp_path / "alone", 32, 10**9).build(ids[:4], paths[:4])
    for image_id, entry in zip(ids[:4], alone.entries, strict=True):
        np.testing.assert_array_equal(np.load(cache.entry(image_id)), np.load(entry))
