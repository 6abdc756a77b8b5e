"""The code's shape: every storage key is spelled in darkroom.layout alone, the core never
imports Prefect, and the house limits on function and module length hold
(tools/house_limits.py)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from darkroom import layout

ROOT = Path(__file__).resolve().parents[2]
KEY_LITERAL = re.compile(r"""["'](models|predictions|reports|index|labeled|incoming)/""")


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


def test_the_core_never_imports_prefect():
    found = []
    for path in (ROOT / "src/darkroom").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                for n in names
                if n.split(".")[0] in ("prefect", "prefect_ray")
            ]
    assert found == [], "src/darkroom imports no Prefect (tasks/ and flows/ do):\n" + "\n".join(
        found
    )


def test_the_house_limits_hold():
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "house_limits.py")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout


def test_key_builders_follow_the_documented_layout():
    assert layout.version("v1", "model.json") == "models/v1/model.json"
    assert layout.fold("v1", 3, "fold.json") == "models/v1/folds/3/fold.json"
    assert layout.fold("v1", 5, "fold.json", refit=True) == "models/v1/refit/fold.json"
    assert layout.predictions("v1", "abc") == "predictions/v1/abc.parquet"
    assert layout.predictions("v1") == "predictions/v1/"
    assert layout.index_snapshot("s") == "index/s.parquet"
    assert layout.quarantine("run-1") == "reports/quarantine/run-1.parquet"
    assert layout.version_of("models/v1/model.json") == "v1"
    assert layout.version_of("models/v1/folds/0/model.json") is None
    assert layout.label_from_key("labeled/cat/a/b.jpg") == "cat"
    assert layout.label_from_key("labeled/top.jpg") is None
    assert layout.labeled_key("cat/1.jpg") == layout.labeled_key("labeled/cat/1.jpg")


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
