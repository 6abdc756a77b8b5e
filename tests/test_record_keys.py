"""Records that cross layers are read by attribute, not by string key: a typo or a renamed
field then fails where it is read (and in the type checker), not as a KeyError at run time.

Each record has one module that writes it (and may spell its keys, for the file it stores);
anywhere else in src/, tasks/ and flows/ a string-key read of its fields is a bug.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "src", ROOT / "tasks", ROOT / "flows"]


def _reads(*keys: str) -> re.Pattern:
    """``x["key"]``, ``x['key']`` and ``x.get("key"...)`` for any of ``keys``."""
    names = "|".join(map(re.escape, keys))
    return re.compile(rf"""\[\s*(["'])(?:{names})\1\s*\]|\.get\(\s*(["'])(?:{names})\2""")


# (record, the module that writes it, the keys, which modules may not read them by key:
# None for every module, else a pattern a module's text must match to be checked).
RECORDS = [
    ("the champion pointer (registry.pointer.Champion)", "src/darkroom/registry/pointer.py",
     re.compile(r"""champion\w*\s*(\[\s*["']version["']|\.get\(\s*["']version["'])"""), None),
    ("the watcher's tick (scoring.watch.Tick)", "src/darkroom/scoring/watch.py",
     _reads("emitted"), None),
    ("the watcher's tick (scoring.watch.Tick)", "src/darkroom/scoring/watch.py",
     _reads("new", "incoming", "scored", "announced", "champion"),
     re.compile(r"\bcheck_incoming\(|\bTick\b")),
    ("the candidate's metrics (registry.evaluation.CandidateMetrics)",
     "src/darkroom/registry/evaluation.py", _reads("cv", "holdout", "folds"),
     re.compile(r"\bCandidateMetrics\b|\bread_metrics\(|metrics\.json")),
    ("an epoch's row", "src/darkroom/training/records.py", _reads("train_loss", "val_loss"), None),
]  # fmt: skip


def key_reads() -> list[str]:
    """``path:line: record: code`` for each string-key read outside the record's writer."""
    found = []
    for path in sorted(p for root in SOURCES for p in root.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        for record, writer, pattern, only_in in RECORDS:
            if rel == writer or (only_in is not None and not only_in.search(text)):
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{rel}:{n}: {record}: {line.strip()}")
    return found


def test_records_are_read_by_attribute_outside_their_writer():
    found = key_reads()
    assert not found, "string-key reads of typed records:\n" + "\n".join(found)
