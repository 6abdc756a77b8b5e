"""The house limits: no function longer than 50 lines (docstring included) and no module
longer than 330 lines in src/darkroom, tasks/ and flows/. Prints each breach; exits 1 if any.

Run by `make lint` and by tests/test_architecture.py.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src/darkroom", "tasks", "flows")
# The house limit on a module is 400 lines; one past 330 already holds two ideas, so split it.
MAX_FUNCTION, MAX_MODULE = 50, 330


def breaches(root: Path = ROOT) -> list[str]:
    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            source = path.read_text()
            name = path.relative_to(root)
            if (lines := source.count("\n")) > MAX_MODULE:
                out.append(f"{name}: module of {lines} lines (> {MAX_MODULE})")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION:
                        out.append(
                            f"{name}:{node.lineno} {node.name}: {length} lines (> {MAX_FUNCTION})"
                        )
    return out


if __name__ == "__main__":
    found = breaches()
    print("\n".join(found) or "house limits hold")
    sys.exit(1 if found else 0)
