"""Label Studio's formats, both ways: what darkroom writes for a labeling queue (the labeling
config, the import file of tasks with pre-annotations, a CSV of the same images) and what it
reads back (the JSON, JSON_MIN and CSV exports, and a plain ``key,label`` CSV).

Pure: bytes and records in, records and text out; ``darkroom.monitoring.labeling`` and
``darkroom.monitoring.answers`` do the storage side. The labeling config names its ``Image``
object ``image`` (so a task's ``data.image`` is the picture) and its ``Choices`` control
``label``: every pre-annotation's ``from_name``/``to_name`` and the exports' column names follow.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

FROM_NAME = "label"  # the Choices control: what a person picks
TO_NAME = "image"  # the Image object, and the task's data field holding the picture's URL
CSV_COLUMNS = ["key", "url", "predicted_label", "confidence", "why"]


class ExportError(ValueError):
    """A file that is no Label Studio export darkroom reads; the message says what it expects."""


@dataclass(frozen=True)
class QueuedImage:
    """One image of a labeling queue.

    Attributes:
        key: Its storage key (``incoming/...``).
        url: Where Label Studio opens it (a presigned URL, else the storage URI).
        label: The champion's prediction, shown as the pre-annotation.
        confidence: Its calibrated probability (the pre-annotation's score).
        why: Why it was queued ("uncertain (margin 0.93)", "random"...).
    """

    key: str
    url: str
    label: str
    confidence: float
    why: str


def labeling_config(classes: Sequence[str]) -> str:
    """The labeling config of a project for the queue: one choice per class, in order."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def choice(label: str) -> dict:
    """One ``result`` item: the class ``label`` picked in the config's Choices."""
    return {
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "choices",
        "value": {"choices": [label]},
    }


def tasks(images: Iterable[QueuedImage], model_version: str) -> list[dict]:
    """The import file's tasks: the picture, its key and why it was queued as data (an
    export carries them back), and the champion's prediction as a pre-annotation."""
    return [
        {
            "data": {TO_NAME: q.url, "key": q.key, "why": q.why},
            "predictions": [
                {
                    "model_version": model_version,
                    "score": round(float(q.confidence), 6),
                    "result": [choice(q.label)],
                }
            ],
        }
        for q in images
    ]


def table(images: Iterable[QueuedImage]) -> str:
    """The queue as CSV text (``CSV_COLUMNS``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for q in images:
        writer.writerow([q.key, q.url, q.label, f"{q.confidence:.6f}", q.why])
    return out.getvalue()


# ---- reading answers back ----------------------------------------------------------------


@dataclass
class Answer:
    """What people said of one task: its key (when the task carries it) or its picture's URL,
    and the label of each annotation that was not cancelled."""

    image: str = ""
    key: str = ""
    labels: list[str] = field(default_factory=list)
    cancelled: int = 0

    @property
    def ref(self) -> str:
        """How reports name the task: its key, else its picture's URL."""
        return self.key or self.image


def read_answers(data: bytes, name: str) -> list[Answer]:
    """The answers in an export (JSON, JSON_MIN or CSV from Label Studio, or a plain CSV with
    the columns ``key`` and ``label``), one per task, in the file's order.

    Raises:
        ExportError: the file is none of these.
    """
    text = data.decode("utf-8-sig", errors="strict").lstrip()
    if text.startswith(("[", "{")):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"{name} is not valid JSON: {e}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ExportError(f"{name}: a Label Studio JSON export is a list of tasks")
        full = any("annotations" in r or "data" in r for r in rows)
        return _merged(_from_tasks(rows, name) if full else _from_rows(rows, name))
    reader = csv.DictReader(io.StringIO(text))
    _check_columns(reader.fieldnames or [], name, "its header")
    return _merged(_from_rows(list(reader), name))


def _from_tasks(rows: list[dict], name: str) -> Iterable[Answer]:
    """Label Studio's JSON export: one task each, with its annotations."""
    for task in rows:
        data = task.get("data")
        if not isinstance(data, dict):
            raise ExportError(f"{name}: task {task.get('id')} has no data object")
        answer = Answer(image=str(data.get(TO_NAME) or ""), key=str(data.get("key") or ""))
        for annotation in task.get("annotations") or []:
            if annotation.get("was_cancelled"):
                answer.cancelled += 1
                continue
            picked = [
                c
                for item in annotation.get("result") or []
                if item.get("type") == "choices"
                for c in (item.get("value") or {}).get("choices") or []
            ]
            answer.labels += picked[:1] if len(set(picked)) == 1 else picked
        yield answer


def _from_rows(rows: list[dict], name: str) -> Iterable[Answer]:
    """JSON_MIN and CSV exports (one row per annotation), and plain ``key,label`` CSV."""
    for i, row in enumerate(rows, 1):
        _check_columns(row.keys(), name, f"row {i}")
        labels = _cell_labels(row[FROM_NAME])
        yield Answer(
            image=str(row.get(TO_NAME) or ""), key=str(row.get("key") or ""), labels=labels
        )


def _check_columns(columns, name: str, where: str) -> None:
    if FROM_NAME not in columns or not ({"key", TO_NAME} & set(columns)):
        raise ExportError(
            f"{name}: {where} has no '{FROM_NAME}' column, or neither 'key' nor '{TO_NAME}': "
            "expected a Label Studio export (JSON, JSON_MIN or CSV) of a project with "
            "darkroom's labeling config, or a CSV with the columns key,label"
        )


def _cell_labels(value) -> list[str]:
    """A JSON_MIN/CSV label cell: the class, or ``{"choices": [...]}`` when several were
    picked (CSV holds that as JSON text); empty when nothing was picked."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    if isinstance(value, dict):
        value = value.get("choices") or []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [] if value is None or value == "" else [str(value)]


def _merged(answers: Iterable[Answer]) -> list[Answer]:
    """One answer per task (rows of one task, one per annotation, come together)."""
    out: dict[str, Answer] = {}
    for a in answers:
        if not a.ref:
            continue
        merged = out.setdefault(a.ref, Answer(image=a.image, key=a.key))
        merged.labels += a.labels
        merged.cancelled += a.cancelled
    return list(out.values())
