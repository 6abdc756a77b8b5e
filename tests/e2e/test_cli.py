"""The `darkroom` command in a process of its own: one-line errors with exit 1, --version, and the start-up that scoring and watching keep free of the training stack."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import write_digits


def darkroom(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "darkroom.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def one_line_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("darkroom: error:")]
    assert len(lines) == 1, run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_version():
    run = darkroom("--version")
    assert run.returncode == 0 and run.stdout.startswith("darkroom ")


def test_an_unknown_uri_scheme_is_one_line():
    one_line_error(darkroom("status", "--storage", "ftp://host/x"), "unsupported storage URI")


def test_a_missing_root_is_one_line(tmp_path):
    run = darkroom("retrain", "--storage", (tmp_path / "nowhere").as_uri(), "--no-pretrained")
    one_line_error(run, "does not exist", "--storage")


def test_an_empty_labeled_folder_is_one_line(tmp_path):
    (tmp_path / "bucket" / "labeled").mkdir(parents=True)
    run = darkroom("retrain", "--storage", (tmp_path / "bucket").as_uri(), "--no-pretrained")
    one_line_error(run, "no images under", "labeled/<class>/")


def test_an_unknown_config_field_is_one_line(tmp_path, local_storage):
    write_digits(local_storage, per_class=5)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    run = darkroom("retrain", "--storage", local_storage.uri, "--config", str(path))
    one_line_error(run, "unknown config field 'train.epochz'")
    path.write_text("train: [1, 2\n")
    one_line_error(darkroom("retrain", "--config", str(path)), "cannot parse")


def test_unreachable_pretrained_weights_stop_at_once_naming_the_ways_out(local_storage):
    write_digits(local_storage, per_class=5)
    # A hub address nothing answers on, and an empty cache: the weights cannot be had.
    env = {"HF_ENDPOINT": "https://127.0.0.1:9", "HF_HOME": str(local_storage.root / "hf")}
    run = darkroom("retrain", "--storage", local_storage.uri, "--backbone", "resnet18", env=env)
    one_line_error(run, "--pretrained-file", "--no-pretrained", "resnet18")


@pytest.mark.parametrize("command", ["retrain", "score", "status"])
def test_errors_exit_1_for_every_command(command):
    one_line_error(darkroom(command, "--storage", "gopher://x"), "unsupported storage URI")


def test_scoring_and_watching_start_without_the_training_stack():
    # A `darkroom score` with nothing new, and the watcher every few minutes, pay only for what
    # they use: torch, timm, OpenCV and the rest load when an image is scored, not at start-up
    # (an import of the decode cache from the runners once cost every run 1.5 s here).
    heavy = ("torch", "timm", "torchvision", "albumentations", "cv2", "sklearn", "matplotlib")
    code = (
        "import sys, darkroom.cli, flows.score, flows.watch; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
