"""MLflow tracking (the ``mlflow`` extra) against a real ``mlflow server`` on 127.0.0.1 with a
SQLite backend, run from a virtualenv of its own (full mlflow does not install beside
darkroom's pins; the client, mlflow-skinny, does). The retrains are the real `darkroom` CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_env, run_darkroom, train_flags, write_digits

pytestmark = pytest.mark.slow

MLFLOW = "mlflow==3.17.2"  # the server; the client's version is pinned in constraints.txt
# Outside the repository, so a CI run creates it once and every test session reuses it.
VENV = Path(
    os.environ.get("DARKROOM_TEST_MLFLOW_VENV", Path.home() / ".cache/darkroom-tests/mlflow-venv")
)
WARNING = "MLflow tracking:"  # how darkroom's warning starts


def _server_python() -> Path:
    """The server venv's python, made on first use (about a minute with a package index)."""
    python = VENV / "bin" / "python"
    if python.exists():
        return python
    tmp = VENV.with_name(f"{VENV.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=120)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", MLFLOW]
    subprocess.run(pip, check=True, timeout=900)
    tmp.rename(VENV)  # whole or absent: an interrupted install is never taken for a venv
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """The server and its workers (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """``mlflow server`` on a free port, SQLite backend, artifacts through the server."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [str(_server_python()), "-m", "mlflow", "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server: no /health within 120 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        log.close()


def _darkroom(tmp_path: Path, mlflow_env: dict, *args: str) -> subprocess.CompletedProcess:
    env = cli_env(tmp_path, DARKROOM_CACHE=str(tmp_path / "dc"), **mlflow_env)
    for name in [k for k in env if k.startswith("MLFLOW_") and k not in mlflow_env]:
        del env[name]
    # a stall on MLflow's own defaults (2 minutes a request, 7 retries) fails the timeout
    return run_darkroom(*args, env=env, timeout=300)


def _retrain(storage, tmp_path, mlflow_env, *extra: str, **recipe) -> dict:
    args = ["retrain", "--storage", storage.uri, "--device", "cpu", *train_flags(**recipe), *extra]
    done = _darkroom(tmp_path, mlflow_env, *args)
    return {**json.loads(done.stdout[done.stdout.index("{") :]), "log": done.stderr + done.stdout}


def test_a_retrain_is_tracked_and_the_champion_alias_follows(
    mlflow_server, local_storage, tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    model = "digits"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "tracked"}
    env["DARKROOM_MLFLOW_MODEL"] = model
    write_digits(local_storage, per_class=24)
    first = _retrain(local_storage, tmp_path, env)
    assert first["promoted"], first["rule"]
    v1 = first["version"]
    assert WARNING not in first["log"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # this process's client too
    client = MlflowClient(mlflow_server, mlflow_server)
    exp = client.get_experiment_by_name("tracked").experiment_id
    (parent,) = client.search_runs(
        [exp], f"tags.`darkroom.version` = '{v1}' and tags.`darkroom.role` = 'retrain'"
    )
    assert parent.info.status == "FINISHED"
    meta = local_storage.read_json(f"models/{v1}/model.json")
    for key, value in meta["train_config"].items():  # the recipe, as params
        expected = value if isinstance(value, str) else json.dumps(value)
        assert parent.data.params[f"train.{key}"] == expected, key
    assert parent.data.params["storage"] == local_storage.uri
    metrics = local_storage.read_json(f"models/{v1}/metrics.json")
    for name in ("accuracy", "f1_macro", "log_loss", "ece"):
        assert parent.data.metrics[f"holdout/{name}"] == pytest.approx(metrics["holdout"][name])
        assert parent.data.metrics[f"cv/{name}/mean"] == pytest.approx(metrics["cv"][name]["mean"])
    temperature = meta["calibration"]["temperature"]
    assert parent.data.metrics["calibration/temperature"] == pytest.approx(temperature)

    folds = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in folds) == ["fold-0", "fold-1"]
    for run in folds:
        fold = local_storage.read_json(f"models/{v1}/folds/{run.info.run_name[-1]}/fold.json")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(5))
        by_step = {m.step: m.value for m in history}
        assert by_step == pytest.approx({r["epoch"]: r["val_accuracy"] for r in fold["history"]})

    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"curves.png", "confusion.png", "decision.json", "README.md", "model"} <= top
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    assert {"model/model.json", "model/model.safetensors"} <= files

    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.tags["darkroom.version"] == v1 and champion.run_id == parent.info.run_id
    assert client.get_model_version_by_alias(model, "challenger").version == champion.version
    got = download_artifacts(f"models:/{model}@champion/model.json", dst_path=str(tmp_path / "dl"))
    assert json.loads(Path(got).read_text())["sha256"] == meta["sha256"]

    # A second version (another recipe) that the gate rejects (no gain can exceed 1): it is the
    # challenger; made champion by hand, then rolled back, the champion alias follows the
    # pointer both ways (the CLI's promote and rollback).
    second = _retrain(local_storage, tmp_path, env, "--min-delta", "1", epochs=1)
    v2 = second["version"]
    assert not second["promoted"] and v2 != v1
    challenger = client.get_model_version_by_alias(model, "challenger")
    assert challenger.tags["darkroom.version"] == v2 and challenger.version != champion.version
    assert client.get_model_version_by_alias(model, "champion").version == champion.version
    _darkroom(tmp_path, env, "promote", v2, "--force", "--storage", local_storage.uri)
    assert client.get_model_version_by_alias(model, "champion").version == challenger.version
    _darkroom(tmp_path, env, "rollback", "--storage", local_storage.uri)
    assert local_storage.read_json("models/champion.json")["version"] == v1
    assert client.get_model_version_by_alias(model, "champion").version == champion.version
    assert len(client.search_model_versions(f"name = '{model}'")) == 2


def test_a_retrain_with_mlflow_not_answering_finishes_and_warns_once(local_storage, tmp_path):
    # A tracking server that accepts connections and never replies: the worst case for a
    # client, which waits on each request until its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        write_digits(local_storage, per_class=24)
        result = _retrain(local_storage, tmp_path, env)
    assert result["promoted"], result["rule"]
    assert local_storage.read_json("models/champion.json")["version"] == result["version"]
    assert result["log"].count(WARNING) == 1, result["log"][-3000:]
