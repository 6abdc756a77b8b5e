"""The production path as deployments/prefect.yaml documents it: a real Prefect server, the two
process work pools, `prefect deploy --all`, and one worker per pool started in an empty folder
(no checkout, no DARKROOM_HOME, no PYTHONPATH: the flows come from the installed package). The
workers run nightly-retrain, score-new-images and watch-incoming against a local storage root.
On the same server, deployments/automations.yaml: a failed nightly run and a rejected model each
fire their automation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.settings import PREFECT_API_URL, temporary_settings

from darkroom.cli.serve import start_server
from darkroom.scoring.chunks import read_predictions
from darkroom.storage import LocalStorage
from tasks.deployments import PREFECT_YAML
from tests.conftest import write_digits
from tests.deploy.automations import AUTOMATIONS_YAML, automations, with_notifications
from tests.e2e.service import Service

pytestmark = pytest.mark.slow

ENTRYPOINTS = {
    "nightly-retrain": "flows.retrain.nightly_retrain",
    "score-new-images": "flows.score.score_new_images",
    "watch-incoming": "flows.watch.watch_incoming",
    "promote-version": "flows.promote_version.promote_version",
    "rollback": "flows.rollback.rollback",
    "cleanup": "flows.cleanup.cleanup",
    "label-queue": "flows.label_queue.label_queue",
}
POOLS = ("darkroom-process", "darkroom-gpu")
TINY_TRAIN = {
    "backbone": "test_resnet",
    "image_size": 32,
    "epochs": 5,  # enough to clear the gate's majority-class baseline
    "folds": 2,
    "batch_size": 4,
    "lr": 0.002,
    "augment": "none",
    "pretrained": False,
}


class Workers(Service):
    """A bare Prefect server (no `darkroom serve`), the prefect CLI run from an empty folder,
    and `prefect worker start` processes. Everything it starts is marked in its environment, so
    teardown finds the flow-run processes the workers spawned too."""

    def __init__(self, tmp: Path):
        super().__init__(tmp)
        self.log = tmp / "server.log"
        self.elsewhere = tmp / "elsewhere"  # the workers' and the CLI's working directory
        self.elsewhere.mkdir()
        for var in ("DARKROOM_HOME", "PYTHONPATH", "DARKROOM_STORAGE", "DARKROOM_CACHE"):
            self.env.pop(var, None)
        self.env.update(
            PREFECT_API_URL=self.api,
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1",
            DARKROOM_TEST_MARK=str(tmp),
            COLUMNS="200",  # the CLI's tables: full names
        )
        self.workers: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 150) -> Workers:
        with mock.patch.dict(os.environ, self.env, clear=True):  # start_server reads os.environ
            self.proc = start_server(self.port, self.log, timeout)
        self.server_pid = self.proc.pid
        return self

    def prefect(self, *args: str, timeout: float = 120, check: bool = True, cwd=None):
        prefect = str(Path(sys.executable).with_name("prefect"))
        out = subprocess.run(
            [prefect, *args],
            cwd=cwd or self.elsewhere,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert not check or out.returncode == 0, (
            f"prefect {' '.join(args)} -> {out.returncode}:\n{out.stdout}\n{out.stderr}"
        )
        return out.stdout if check else out

    def start_worker(self, pool: str) -> None:
        prefect = str(Path(sys.executable).with_name("prefect"))
        with open(self.tmp / f"worker-{pool}.log", "wb") as log:
            self.workers[pool] = subprocess.Popen(
                [prefect, "worker", "start", "--pool", pool, "--name", f"test-{pool}"],
                cwd=self.elsewhere,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_workers_online(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = [self.post(f"/work_pools/{pool}/workers/filter", {}) for pool in self.workers]
            if all(any(w["status"] == "ONLINE" for w in ws) for ws in online):
                return
            for pool, proc in self.workers.items():
                assert proc.poll() is None, f"worker {pool} exited:\n{self.tail()}"
            time.sleep(0.5)
        raise TimeoutError(f"workers not online:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs()]
        return "\n".join(parts)

    def logs(self) -> list[Path]:
        return sorted(self.tmp.glob("*.log"))

    def kill(self) -> None:
        """Workers (SIGTERM, then SIGKILL), every process carrying this test's mark (the
        flow runs the workers started), then the server."""
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for pid in marked_processes(str(self.tmp)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        super().kill()


def marked_processes(mark: str) -> list[int]:
    """This user's processes whose environment has DARKROOM_TEST_MARK=<mark>."""
    needle = f"DARKROOM_TEST_MARK={mark}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


def lap(step: str, since: float) -> float:
    """Prints how long a step took; returns now (the next step's start)."""
    now = time.monotonic()
    print(f"[test_workers] {step}: {now - since:.1f} s", flush=True)
    return now


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A server with prefect.yaml deployed to its two pools, automations.yaml created, and one
    online worker per pool, each in an empty folder. Stopped, flow runs and all, at the end."""
    t = time.monotonic()
    tmp = tmp_path_factory.mktemp("workers")
    service = Workers(tmp)
    try:
        service.start()
        for pool in POOLS:
            service.prefect("work-pool", "create", pool, "--type", "process")
        t = lap("server started, work pools created", t)
        # Deployed from a folder that is not the checkout: nothing about it may depend on one.
        service.prefect("--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all")
        t = lap("prefect deploy --all", t)
        service.prefect("automation", "create", "--from-file", str(AUTOMATIONS_YAML))
        t = lap("prefect automation create --from-file", t)
        for pool in POOLS:
            service.start_worker(pool)
        service.wait_workers_online()
        lap("workers online", t)
        yield service
    finally:
        service.kill()
    assert not marked_processes(str(tmp)), "processes left running"


def events(service: Service, name: str, at_least: int = 1, timeout: float = 30) -> list[dict]:
    body = {"filter": {"event": {"name": [name]}}, "limit": 50}
    deadline = time.monotonic() + timeout
    while len(found := service.post("/events/filter", body)["events"]) < at_least:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return found


def triggering(service: Service, fired: dict) -> dict:
    """The event that fired an automation (its prefect.automation.triggered event names it)."""
    (ref,) = [r for r in fired["related"] if r["prefect.resource.role"] == "triggering-event"]
    event_id = ref["prefect.resource.id"].removeprefix("prefect.event.")
    body = {"filter": {"id": {"id": [event_id]}}, "limit": 1}
    (event,) = service.post("/events/filter", body)["events"]
    return event


def run_to_end(service: Workers, name: str, params: dict, timeout: float = 180) -> dict:
    run = service.wait_run(service.run_deployment(name, params), timeout)
    assert run["state_type"] == "COMPLETED", f"{name}: {run['state_name']}\n{service.tail()}"
    return run


def test_prefect_deploy_registers_the_three_deployments(deployed):
    assert "darkroom-gpu" in deployed.prefect("work-pool", "ls")
    listed = deployed.prefect("deployment", "ls")
    assert all(f"{name}/{name}" in listed for name in ENTRYPOINTS), listed
    by_name = {d["name"]: d for d in deployed.post("/deployments/filter", {"limit": 50})}
    assert set(by_name) == set(ENTRYPOINTS)
    for name, entrypoint in ENTRYPOINTS.items():
        d = by_name[name]
        # Nothing ties a deployment to the folder it was deployed from.
        assert d["entrypoint"] == entrypoint and d["pull_steps"] == [] and d["path"] is None
    assert by_name["nightly-retrain"]["work_pool_name"] == "darkroom-gpu"
    assert by_name["score-new-images"]["work_pool_name"] == "darkroom-process"
    assert by_name["nightly-retrain"]["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"


def test_workers_in_an_empty_folder_train_score_and_watch(deployed, tmp_path):
    t = time.monotonic()
    storage = LocalStorage(tmp_path / "bucket")
    truth = write_digits(storage, classes=("0", "1", "2"), per_class=30, incoming=10)
    incoming = {k for k in truth if k.startswith("incoming/")}
    assert len(incoming) == 10
    runtime = {"storage": storage.uri, "device": "cpu", "num_workers": 0}
    retrain = {**runtime, "cache_dir": str(tmp_path / "cache"), "train": TINY_TRAIN}

    run = run_to_end(deployed, "nightly-retrain/nightly-retrain", {"config": retrain})
    assert run["name"].startswith("retrain-test_resnet-2folds-5ep-")
    champion = json.loads(storage.read_text("models/champion.json"))
    t = lap("nightly-retrain on the darkroom-gpu worker", t)

    run_to_end(deployed, "score-new-images/score-new-images", {"config": runtime})
    files = [o.key for o in storage.list(f"predictions/{champion['version']}/")]
    assert files and all(f.endswith(".parquet") for f in files)
    preds = read_predictions(storage, champion["version"])
    assert sorted(preds["key"]) == sorted(incoming) and (preds["status"] == "ok").all()
    t = lap("score-new-images on the darkroom-process worker", t)

    run = run_to_end(
        deployed, "watch-incoming/watch-incoming", {"config": {"storage": storage.uri}}
    )
    assert run["name"].startswith("watch-")
    assert not events(deployed, "darkroom.images.arrived", timeout=2)  # all scored already
    lap("watch-incoming on the darkroom-process worker", t)


def test_cancelling_a_nightly_run_stops_its_fold_at_once(deployed, tmp_path):
    """Cancel, as the UI's button does it, mid-fold: the worker sends SIGTERM to the flow-run
    process, whose fold stops at its next batch; the run ends Cancelled long before the fold's
    2,000 epochs would, with the lease released and no fold marked finished."""
    storage = LocalStorage(tmp_path / "bucket")
    write_digits(storage, classes=("0", "1", "2"), per_class=30)
    config = {
        "storage": storage.uri,
        "device": "cpu",
        "num_workers": 0,
        "cache_dir": str(tmp_path / "cache"),
        "checkpoint_every_seconds": 0,
        "train": {**TINY_TRAIN, "epochs": 2000},
    }
    run_id = deployed.run_deployment("nightly-retrain/nightly-retrain", {"config": config})
    deadline = time.monotonic() + 180
    while not any(o.key.endswith("folds/0/checkpoint.pt") for o in storage.list("models/")):
        assert time.monotonic() < deadline, f"no checkpoint in time:\n{deployed.tail()}"
        time.sleep(0.5)
    t = time.monotonic()
    deployed.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}})
    run = deployed.wait_run(run_id, timeout=120)
    took = time.monotonic() - t
    assert run["state_type"] == "CANCELLED", f"{run['state_name']}\n{deployed.tail()}"
    assert not storage.exists("leases/retrain.json"), "the lease was left behind"
    assert not [o.key for o in storage.list("models/") if o.key.endswith("fold.json")]
    lap(f"cancelled mid-fold, Cancelled after {took:.1f} s", t)


def test_automations_fire_on_a_failed_nightly_run_and_a_rejected_model(deployed, tmp_path):
    """automations.yaml as written (do-nothing: a prefect.automation.triggered event), and with
    its documented send-notification action pointed at a webhook block."""
    t = time.monotonic()
    received: list[dict] = []
    hook = webhook(received)
    try:
        with temporary_settings(updates={PREFECT_API_URL: deployed.api}):
            block_id = CustomWebhookNotificationBlock(
                name="darkroom-test",
                url=f"http://127.0.0.1:{hook.server_port}/hook",
                json_data={"subject": "{{subject}}", "body": "{{body}}"},
                allow_private_urls=True,
            ).save("darkroom-test-hook")
        notifying = with_notifications(block_id, suffix="-notify")
        deployed.prefect("automation", "create", "--from-json", json.dumps(notifying))

        empty = tmp_path / "empty"  # no labeled image: the run fails at once
        empty.mkdir()
        failing = {"config": {"storage": empty.as_uri(), "device": "cpu", "train": TINY_TRAIN}}
        failed = deployed.wait_run(
            deployed.run_deployment("nightly-retrain/nightly-retrain", failing)
        )
        assert failed["state_type"] == "FAILED", deployed.tail()
        assert "DatasetError: no images under" in failed["state"]["message"]
        t = lap("a failing nightly-retrain run", t)
        storage_id = f"darkroom.storage.{empty.as_uri()}"
        for emitted in ("darkroom.model.rejected", "darkroom.drift.detected"):
            deployed.prefect("event", "emit", emitted, "--resource-id", storage_id)

        fired = events(deployed, "prefect.automation.triggered", at_least=6)
        by_name = {e["resource"]["prefect.resource.name"]: triggering(deployed, e) for e in fired}
        names = [a["name"] for a in automations()]
        assert set(by_name) == {*names, *(n + "-notify" for n in names)}, fired
        failure = by_name["darkroom-nightly-retrain-failed"]
        assert failure["event"] == "prefect.flow-run.Failed"
        assert failure["resource"]["prefect.resource.id"] == f"prefect.flow-run.{failed['id']}"
        assert by_name["darkroom-model-rejected"]["event"] == "darkroom.model.rejected"
        assert by_name["darkroom-drift-detected"]["event"] == "darkroom.drift.detected"

        deadline = time.monotonic() + 30
        while len(received) < len(names) and time.monotonic() < deadline:
            time.sleep(0.5)
        subjects = sorted(r["subject"] for r in received)
        assert subjects == sorted(f"darkroom: {n}-notify" for n in names), received
        bodies = {r["subject"]: r["body"] for r in received}
        assert bodies["darkroom: darkroom-nightly-retrain-failed-notify"].startswith(
            f"prefect.flow-run.Failed for {failed['name']} at "
        )
        assert bodies["darkroom: darkroom-model-rejected-notify"].startswith(
            f"darkroom.model.rejected for {storage_id} at "
        )
        assert bodies["darkroom: darkroom-drift-detected-notify"].startswith(
            f"darkroom.drift.detected for {storage_id} at "
        )
        lap("automations fired, notifications sent", t)
    finally:
        hook.shutdown()
        hook.server_close()


def webhook(received: list[dict]) -> ThreadingHTTPServer:
    """A local HTTP endpoint that records the JSON bodies POSTed to it."""

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_schedules_create_upcoming_runs(tmp_path):
    """The nightly cron fires only if the server's scheduler creates its runs ahead of time (with
    SQLAlchemy 2.1 Prefect 3.8.8's scheduler failed on every loop: pinned below it). A server
    of its own, scheduler on, no worker: the runs stay scheduled."""
    service = Workers(tmp_path)
    service.env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "true"
    try:
        service.start()
        for pool in POOLS:
            service.prefect("work-pool", "create", pool, "--type", "process")
        service.prefect("--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all")
        deadline = time.monotonic() + 120
        # The scheduler fills one deployment after another: wait for both.
        while not (
            (upcoming := service.flow_runs("nightly-retrain", scheduled=True))
            and (hourly := service.flow_runs("score-new-images", scheduled=True))
        ):
            assert time.monotonic() < deadline, (
                "no scheduled nightly-retrain or score-new-images run\n" + service.tail()
            )
            time.sleep(2)
        assert all(r["expected_start_time"][11:16] == "02:00" for r in upcoming)
        assert all(r["expected_start_time"][14:16] == "00" for r in hourly)
    finally:
        service.kill()
