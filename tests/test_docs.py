"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link or a page
missing from the nav fails), the README stays a short front door that opens with the two
commands, and the generated options page lists every config field."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from darkroom.config import RetrainConfig, ScoreConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 10_000
OPENING = "# darkroom\n\n```bash\nmake demo\nmake test\n```\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_site_builds_strictly(site):
    assert (site / "index.html").is_file()


def test_the_readme_is_short_and_opens_with_the_two_commands():
    data = README.read_bytes()
    assert len(data) <= README_LIMIT, f"README.md is {len(data)} bytes (limit {README_LIMIT})"
    assert data.decode().startswith(OPENING)


@pytest.mark.parametrize("model", [RetrainConfig, TrainConfig, ScoreConfig])
def test_the_options_page_lists_every_config_field(site, model):
    page = (site / "options" / "index.html").read_text()
    missing = [name for name in model.model_fields if f"<code>{name}</code>" not in page]
    assert not missing, f"{model.__name__} fields missing from the options page: {missing}"


def test_the_benchmarks_page_shows_the_committed_results(site):
    page = (site / "benchmarks" / "index.html").read_text()
    assert "<!-- bench:" not in page and "benchmarks/results/" in page
    assert "p1_train_efficiency" in page


def test_every_test_the_guarantees_page_names_exists():
    """docs/guarantees.md names each test as `path::function`; a moved or renamed test must
    move the page with it."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    refs = re.findall(r"`(tests/[^`:]+)::(\w+)`", text)
    assert refs
    missing = [
        f"{path}::{name}"
        for path, name in refs
        if not (ROOT / path).is_file()
        or not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.MULTILINE)
    ]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
