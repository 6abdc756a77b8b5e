"""Scoring at the model's speed: storage-to-Parquet images/s against the model alone.

Writes a local storage root with labeled digits and N unlabeled 32 px PNGs (5,000; quick: 500),
trains a resnet18 at 32 px for one epoch (the weights do not matter) and promotes it, then, in
one process and side by side:

- model-only img/s: the champion's own forward pass (``LoadedModel.forward``: same model,
  batch size, device and precision) on tensors made beforehand, under ``inference_mode``;
- end-to-end img/s: ``pending_chunks`` + ``score_chunk`` on every chunk (fetch, decode, resize,
  model, rows, Parquet write), with the model already loaded;
- ``p2_score_efficiency`` = end-to-end / model-only (target >= 0.85), the two timed a chunk of
  each in turn, three rounds, the median round's;
- ``predict`` alone (decode + model) decoding in turn, with a thread ahead, with a DataLoader
  worker: which way is faster on this machine;
- ``startup_seconds``: the real ``darkroom score`` CLI on the same root once everything is
  scored (nothing to score: its fixed cost, imports + Prefect server + flow run) on the
  temporary server darkroom starts beside its imports; ``startup_prefect_temporary_seconds``
  the same with Prefect starting it when the flow first calls its API
  (DARKROOM_TEMPORARY_SERVER=0: the baseline); ``startup_running_server_seconds`` against a
  server already running (PREFECT_API_URL); the three taken in turn, medians of three; and the
  imports alone.

    python benchmarks/bench_score.py [--quick] [--images N] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _write_images(storage, n_incoming: int) -> None:
    """Labeled digits (4 classes) and ``n_incoming`` real digit PNGs under incoming/."""
    from sklearn.datasets import load_digits

    from darkroom.cli.demo import digit_png

    digits = load_digits()
    for i in range(200):
        if digits.target[i] < 4:
            storage.put_source_object(
                f"labeled/{digits.target[i]}/d-{i:04d}.png", digit_png(digits.data[i], 32)
            )
    m = len(digits.target)
    for j in range(n_incoming):
        # one digit seen through many names: every file a real PNG, every key its own
        png = digit_png(digits.data[j % m], 32)
        storage.put_source_object(f"incoming/batch-{j // 1000:02d}/img-{j:05d}.png", png)


def make_champion(folder: Path, n_incoming: int, device: str) -> tuple[object, str, object]:
    """A storage root with a promoted resnet18 (32 px, 1 epoch, 2 folds) and the images.

    Returns the storage, the champion version and the ScoreConfig to score it with.
    """
    from darkroom.cli.demo import DEMO_TRAIN
    from darkroom.config import RetrainConfig, ScoreConfig
    from darkroom.data.index import rebuild_index
    from darkroom.data.sync import sync_labeled
    from darkroom.monitoring.keeping import keep_reference
    from darkroom.registry import pointer
    from darkroom.storage import open_storage
    from darkroom.training.candidate import finalize_candidate
    from darkroom.training.fold import train_fold

    storage = open_storage(f"file://{folder / 'bucket'}")
    _write_images(storage, n_incoming)
    train = DEMO_TRAIN.model_copy(update={"epochs": 1, "folds": 2, "batch_size": 32})
    cache = str(folder / "cache")
    config = RetrainConfig(storage=storage.uri, cache_dir=cache, device=device, train=train)
    sync_labeled(storage, config)
    snap = rebuild_index(storage, config, "bench").snapshot
    version = pointer.new_version(snap, train.fingerprint())
    folds = [train_fold(storage, config, snap, version, k) for k in range(train.folds)]
    finalize_candidate(storage, train, snap, version, folds)
    keep_reference(storage, config, snap, version)  # scoring flags unfamiliar images with it
    pointer.promote(
        storage, version, expected_etag=None, action="promote", reason="benchmark champion"
    )
    return storage, version, ScoreConfig(storage=storage.uri, cache_dir=cache, device=device)


def model_seconds(loaded, batches: list, n: int) -> float:
    """Seconds of the forward pass alone on ``n`` images of ``batches`` (made beforehand)."""
    todo = batches[: -(-n // len(batches[0]))]
    t0 = time.perf_counter()
    for b in todo:
        loaded.forward(b).cpu()  # probabilities reach the host, as scoring needs them
    return time.perf_counter() - t0


def side_by_side(loaded, storage, config, version: str) -> dict[str, float]:
    """Seconds of end-to-end scoring (``pending_chunks`` + ``score_chunk`` on every chunk: fetch,
    decode, resize, model, rows, Parquet) with the per-image drift work on (embeddings from the
    same pass, PCA, distances, unfamiliar flags) and off, and of the model alone on as many
    images: a chunk of each in turn, so that a shared machine's load, which changes by the
    second, falls on all three alike; then the run's drift report (a fixed cost per run).
    Returns the seconds of each and the rows written."""
    import torch

    from darkroom import layout
    from darkroom.monitoring.report import run_drift
    from darkroom.scoring.chunks import score_chunk
    from darkroom.scoring.plan import pending_chunks

    size, bs = loaded.meta["image_size"], config.batch_size
    batches = [
        torch.rand(bs, 3, size, size).to(loaded.device) for _ in range(-(-config.chunk_size // bs))
    ]
    loaded.forward(batches[0])  # warm-up: cuDNN picks its kernels here
    # Every round scores all again, from a root as a new champion finds it: no predictions of
    # this version and no ledger rows.
    for prefix in (layout.predictions(version), layout.LEDGER):
        for obj in storage.list(prefix):
            storage.delete(obj.key)
    off = config.model_copy(update={"drift": config.drift.model_copy(update={"enabled": False})})
    t0 = time.perf_counter()
    plan = pending_chunks(storage, version, config.chunk_size)
    planned = time.perf_counter() - t0
    took = {"drift_on": planned, "drift_off": planned, "model": 0.0, "rows": 0}
    files = []
    for chunk in plan.chunks:
        # the same chunk twice writes the same file: the last one written must carry the drift
        # columns the report reads, so drift off goes first
        for name, cfg in (("drift_off", off), ("drift_on", config)):
            t0 = time.perf_counter()
            result = score_chunk(storage, cfg, version, chunk)
            took[name] += time.perf_counter() - t0
        took["rows"] += result.images
        files.append(result.key)
        took["model"] += model_seconds(loaded, batches, len(chunk))
    t0 = time.perf_counter()
    if run_drift(storage, config, version, files, "bench") is None:
        raise RuntimeError("no drift report: the champion keeps no reference")
    took["report"] = time.perf_counter() - t0  # once per run, whatever its size
    return took


def decode_paths(loaded, storage, config) -> dict[str, float]:
    """img/s of ``predict`` (decode + model, no fetch, no rows) over the incoming files in
    chunks, for each way of decoding, in turn on each chunk: decoding in turn, a thread
    decoding ahead, a DataLoader worker (started per chunk, as ``score_chunk`` does)."""
    files = [str(storage.local_path(o.key)) for o in storage.list("incoming/")]
    chunks = [files[i : i + config.chunk_size] for i in range(0, len(files), config.chunk_size)]
    ways = {"in_turn": {"prefetch": 0}, "thread": {"prefetch": 2}, "worker": {"num_workers": 1}}
    seconds = dict.fromkeys(ways, 0.0)
    for chunk in chunks:
        for name, options in ways.items():
            t0 = time.perf_counter()
            loaded.predict(chunk, config.batch_size, **options)
            seconds[name] += time.perf_counter() - t0
    return {f"predict_{k}_img_s": round(len(files) / v, 1) for k, v in seconds.items()}


def _cli_seconds(storage_uri: str, device: str, api_url: str | None, early: bool = True) -> float:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env["DARKROOM_TEMPORARY_SERVER"] = "1" if early else "0"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    cmd = [sys.executable, "-m", "darkroom.cli", "score", "--storage", storage_uri]
    t0 = time.perf_counter()
    out = subprocess.run(
        [*cmd, "--device", device], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - t0
    if out.returncode != 0 or '"scored": 0' not in out.stdout:
        raise RuntimeError(f"darkroom score failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return seconds


def startup(storage_uri: str, device: str, rounds: int = 3) -> dict:
    """The ``darkroom score`` CLI's fixed cost, run for real with nothing left to score: on
    Prefect's temporary server (no PREFECT_API_URL) and against a server already running (a
    ``darkroom serve`` or a deployment's worker), taken in turn; medians."""
    from darkroom.cli.serve import _healthy, start_server, stop_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="darkroom-bench-prefect-"))
    saved = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)  # the server's own database, not the user's
    try:
        server = start_server(port, home / "server.log")
    finally:
        if saved is None:
            os.environ.pop("PREFECT_HOME")
        else:
            os.environ["PREFECT_HOME"] = saved
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        if not _healthy(api_url):
            raise RuntimeError(f"the Prefect server for the start-up runs did not answer: {home}")
        temporary, prefects, running = [], [], []
        for _ in range(rounds):
            temporary.append(_cli_seconds(storage_uri, device, None))
            prefects.append(_cli_seconds(storage_uri, device, None, early=False))
            running.append(_cli_seconds(storage_uri, device, api_url))
    finally:
        stop_process_group(server)
        shutil.rmtree(home, ignore_errors=True)
    t0 = time.perf_counter()
    imports = "import darkroom.cli, flows.score, darkroom.model.backbone"
    subprocess.run([sys.executable, "-c", imports], check=True)
    return {
        "startup_seconds": round(statistics.median(temporary), 2),
        "startup_prefect_temporary_seconds": round(statistics.median(prefects), 2),
        "startup_running_server_seconds": round(statistics.median(running), 2),
        "startup_imports_seconds": round(time.perf_counter() - t0, 2),
        "startup_rounds": {
            "temporary": temporary,
            "prefect_temporary": prefects,
            "running": running,
        },
    }


def run(quick: bool = False, images: int | None = None, device: str = "auto") -> dict:
    """Measures everything above in one process; returns a JSON-able dict."""
    import torch

    from darkroom.model.inference import load_version

    n = images or (500 if quick else 5000)
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-score-") as tmp:
        storage, version, config = make_champion(Path(tmp), n, device)
        t0 = time.perf_counter()
        loaded = load_version(storage, version, config.device)
        load_s = time.perf_counter() - t0
        rounds = []
        for _ in range(3):
            took = side_by_side(loaded, storage, config, version)
            if took["rows"] != n:
                raise RuntimeError(f"scored {took['rows']} rows of {n} images")
            on, off, model = took["drift_on"], took["drift_off"], took["model"]
            rounds.append((model / on, n / on, n / model, off / on, n / off, took["report"]))
        ratio, e2e_ips, model_ips, drift_ratio, off_ips, report_s = sorted(rounds)[1]  # median
        details = {
            "images": n,
            "end_to_end_img_s": round(e2e_ips, 1),
            "end_to_end_without_drift_img_s": round(off_ips, 1),
            "model_only_img_s": round(model_ips, 1),
            "ratios_of_rounds": [round(r[0], 3) for r in rounds],
            "drift_ratios_of_rounds": [round(r[3], 3) for r in rounds],
            "drift_report_seconds": round(report_s, 2),
            "model_load_seconds": round(load_s, 2),
            "batch_size": config.batch_size,
            "chunk_size": config.chunk_size,
            "num_workers": config.num_workers,
            "device": _device_name(loaded.device),
            **decode_paths(loaded, storage, config),
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            **startup(storage.uri, device),
        }
    return {
        "p2_score_efficiency": round(ratio, 3),
        # img/s with the per-image drift work on (embeddings, flags) over img/s without it,
        # side by side (target: at least 0.95); the run's report is drift_report_seconds
        # once per run, in details
        "p2_drift_throughput_ratio": round(drift_ratio, 3),
        "details": details,
    }


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="500 images instead of 5,000")
    p.add_argument("--images", type=int, help="unlabeled images to score")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    result = run(a.quick, a.images, a.device)
    d = result["details"]
    print(f"{'device':<28}{d['device']}")
    print(f"{'images':<28}{d['images']}")
    print(f"{'model only (img/s)':<28}{d['model_only_img_s']}")
    print(f"{'end to end (img/s)':<28}{d['end_to_end_img_s']}")
    print(f"{'p2_score_efficiency':<28}{result['p2_score_efficiency']}  (target >= 0.85)")
    for way in ("in_turn", "thread", "worker"):
        print(f"{'  predict, ' + way + ' (img/s)':<28}{d[f'predict_{way}_img_s']}")
    print(f"{'CLI start-up (s)':<28}{d['startup_seconds']}  (temporary server, started early)")
    print(f"{'  Prefect starting it (s)':<28}{d['startup_prefect_temporary_seconds']}")
    print(f"{'  with a running server (s)':<28}{d['startup_running_server_seconds']}")
    print(f"{'  of which imports (s)':<28}{d['startup_imports_seconds']}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
