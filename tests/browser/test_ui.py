"""The Prefect UI in a real browser (Playwright driving Debian's Chromium, headless): the
nightly-retrain deployment with its schedule, a completed run of it and its artifacts.
Screenshots go to tests/browser/output/. Outside CI a missing browser skips; in CI it fails
(.ci/run installs Chromium)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.service import shared_service

pytestmark = pytest.mark.slow

OUTPUT = Path(__file__).parent / "output"
CHROMIUM = os.environ.get("DARKROOM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail(
                f"no Chromium at {CHROMIUM}: .ci/run installs it (apt-get install chromium)"
            )
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def test_the_ui_shows_the_deployment_its_schedule_a_run_and_its_artifacts(
    page, request, tmp_path_factory
):
    service = shared_service(request, tmp_path_factory)
    run = service.retrained()  # a manual run of nightly-retrain, completed
    OUTPUT.mkdir(exist_ok=True)
    (nightly,) = [
        d
        for d in service.post("/deployments/filter", {"limit": 50})
        if d["name"] == "nightly-retrain"
    ]

    page.goto(f"{service.ui}/deployments")
    page.get_by_text("nightly-retrain").first.wait_for()
    page.get_by_text("score-new-images").first.wait_for()
    page.get_by_text("watch-incoming").first.wait_for()
    page.screenshot(path=OUTPUT / "deployments.png", full_page=True)

    page.goto(f"{service.ui}/deployments/deployment/{nightly['id']}")
    page.get_by_text(re.compile(r"At 02:00 AM")).first.wait_for()  # cron 0 2 * * *, UTC
    page.screenshot(path=OUTPUT / "nightly-retrain-deployment.png", full_page=True)

    page.goto(f"{service.ui}/runs/flow-run/{run['id']}")
    page.get_by_text(run["name"]).first.wait_for()
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=OUTPUT / "nightly-retrain-run.png", full_page=True)
    page.get_by_text("Artifacts", exact=True).first.click()
    for key in ("fold-metrics", "promotion-decision"):
        page.get_by_text(key).first.wait_for()
    page.get_by_text(re.compile(r"train-fold-0: fold 1 of 2")).first.wait_for()  # progress
    page.screenshot(path=OUTPUT / "nightly-retrain-run-artifacts.png", full_page=True)

    page.get_by_text("promotion-decision").first.click()
    page.get_by_text(re.compile("Promoted")).first.wait_for()
    page.get_by_text(re.compile("confusion")).first.wait_for()
    page.screenshot(path=OUTPUT / "promotion-decision.png", full_page=True)
