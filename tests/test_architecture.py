"""The code's shape, checked on the source tree: the layers and "no cycles" (import-linter's
contracts in pyproject.toml), every storage key spelled in darkroom.layout alone, the house
limits (tools/house_limits.py), records read through their fields, and flows/ and tasks/
importable from the installed distribution."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_LITERAL = re.compile(r"""["'](models|predictions|reports|index|labeled|incoming)/""")


def test_the_import_contracts_hold():
    """Layers (cli > flows > tasks > stages > storage > config), no Prefect in the core, no
    cycles between the modules of a package."""
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_no_storage_key_is_spelled_outside_the_layout_module():
    found = []
    for folder in ("src/darkroom", "tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "layout.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if KEY_LITERAL.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == [], "storage keys belong in darkroom/layout.py:\n" + "\n".join(found)


def test_the_house_limits_hold():
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "house_limits.py")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout


def test_flows_and_tasks_import_from_the_installed_package_anywhere(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", "import flows.retrain, flows.score, flows.watch, tasks.train"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
