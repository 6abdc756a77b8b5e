"""People's labels back in: ``darkroom import-labels`` appends the answers of a Label Studio
export (or a ``key,label`` CSV) to the labels file at the root, which the next retrain reads.

A task is found by the ``key`` its data carries (every task of a darkroom queue does), else by
its picture: a storage URI under the root, or a link of one of the root's queues. Nothing is
overwritten: an answer that disagrees with a label already given (the labels file, or the
class folder of an image under labeled/) is reported and left out, as are answers two people
disagree on, images that do not exist, and classes the champion does not know (unless new
classes are allowed). The append is a conditional write: a concurrent writer is never lost.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pandas as pd

from darkroom import layout
from darkroom.data.index import read_index
from darkroom.data.labels import LabelFile, read_labels
from darkroom.monitoring.labeling import champion_classes
from darkroom.monitoring.labelstudio import Answer, read_answers
from darkroom.storage import PreconditionFailed, Storage, StorageError, UnsafeKeyError, check_key

# Tries of the read, judge and conditional write when another writer changes the file between.
ATTEMPTS = 3


@dataclass
class ImportReport:
    """What an import did with each answer (keys, or the task's picture when no key is known).

    Attributes:
        added: key -> label appended (or that would be, in a dry run).
        unchanged: keys that already had the same label.
        skipped: tasks without an answer (every annotation cancelled).
        unknown: task -> why it names no image of the root.
        new_classes: key -> a label the champion does not know (refused without allow_new_classes).
        disagreements: key -> the different labels people gave it (refused).
        conflicts: key -> (the label it has, the label given) (refused: the first one stays).
        labels_file: Where the labels were appended.
        written: Whether the labels file was written.
    """

    source: str
    labels_file: str = ""
    added: dict[str, str] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)
    new_classes: dict[str, str] = field(default_factory=dict)
    disagreements: dict[str, list[str]] = field(default_factory=dict)
    conflicts: dict[str, tuple[str, str]] = field(default_factory=dict)
    written: bool = False

    @property
    def refused(self) -> int:
        """Answers left out that someone should look at."""
        return sum(map(len, (self.unknown, self.new_classes, self.disagreements, self.conflicts)))


def known_classes(storage: Storage) -> list[str]:
    """The champion's classes; without a champion, the latest index's; else none."""
    try:
        return champion_classes(storage)[1]
    except FileNotFoundError:
        pass
    try:
        return read_index(storage).classes
    except FileNotFoundError:
        return []


def queue_links(storage: Storage) -> dict[str, str]:
    """Every queue's image link (without its query: a presigned signature) -> its key."""
    links = {}
    for obj in storage.list(layout.LABEL_QUEUE):
        if obj.key.endswith(".json") and layout.label_queue_time(obj.key) is not None:
            for task in storage.read_json(obj.key):
                data = task.get("data", {})
                if "key" in data and "image" in data:
                    links[_without_query(data["image"])] = data["key"]
    return links


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else url


def key_of(storage: Storage, answer: Answer, links) -> tuple[str | None, str]:
    """The storage key an answer is about, or None and why it names none. ``links`` is a
    callable giving ``queue_links`` (read only when a task carries no key)."""
    key = answer.key
    base = storage.url("")
    if not key and answer.image.startswith(base):
        key = answer.image[len(base) :]
    elif not key:
        key = links().get(_without_query(answer.image))
        if key is None:
            return None, f"{answer.image} is not under {storage.uri} nor a link of its queues"
    try:
        check_key(key)
    except UnsafeKeyError as e:
        return None, str(e)
    if not key.startswith((layout.INCOMING, layout.LABELED)):
        return None, f"{key} is not an image under {layout.INCOMING} or {layout.LABELED}"
    if not storage.exists(key):
        return None, f"no such object: {storage.url(key)}"
    return key, ""


def resolve(storage: Storage, answers: list[Answer], report: ImportReport) -> dict[str, set]:
    """key -> the labels given to it; unknown tasks go to the report."""
    cached: dict[str, str] | None = None

    def links() -> dict[str, str]:
        nonlocal cached
        cached = queue_links(storage) if cached is None else cached
        return cached

    given: dict[str, set] = defaultdict(set)
    for answer in answers:
        key, why = key_of(storage, answer, links)
        if key is None:
            report.unknown[answer.ref] = why
        elif not answer.labels:
            report.skipped.append(key)
        else:
            given[key] |= set(answer.labels)
    return given


def existing_label(file: LabelFile, key: str) -> str | None:
    """The label ``key`` has already: the labels file's, else its class folder's."""
    if key in file.conflicts:
        return " or ".join(file.conflicts[key])
    return file.labels.get(key) or layout.label_from_key(key)


def judge(report: ImportReport, given: dict, file: LabelFile, classes, allow_new: bool) -> None:
    """Sorts each key's answer into the report: added, unchanged or one of the refusals."""
    report.added, report.unchanged, report.new_classes = {}, [], {}
    report.disagreements, report.conflicts = {}, {}
    for key, labels in sorted(given.items()):
        label, before = min(labels), existing_label(file, key)
        if len(labels) > 1:
            report.disagreements[key] = sorted(labels)
        elif before == label:
            report.unchanged.append(key)
        elif before is not None:
            report.conflicts[key] = (before, label)
        elif label not in classes and not allow_new:
            report.new_classes[key] = label
        else:
            report.added[key] = label


def import_labels(
    storage: Storage,
    data: bytes,
    source: str,
    *,
    allow_new_classes: bool = False,
    dry_run: bool = False,
) -> ImportReport:
    """Reads an export (``data``, named ``source`` in messages and in the labels file), judges
    each answer and appends the accepted ones to the labels file (none in a dry run).

    Raises:
        ExportError: the file is no export darkroom reads.
        StorageError: the labels file changed under every one of ``ATTEMPTS`` tries.
    """
    report = ImportReport(source=source)
    given = resolve(storage, read_answers(data, source), report)
    classes = set(known_classes(storage))
    for _ in range(ATTEMPTS):
        name, etag = labels_file(storage)
        report.labels_file = storage.url(name)
        judge(report, given, read_labels(storage), classes, allow_new_classes)
        if dry_run or not report.added:
            return report
        try:
            append(storage, name, etag, report.added, source)
        except PreconditionFailed:
            continue  # another writer got there first: read again, judge again
        report.written = True
        return report
    raise StorageError(
        f"{storage.url(name)} changed {ATTEMPTS} times while the labels were appended: "
        "another import is running; try again when it is done"
    )


def labels_file(storage: Storage) -> tuple[str, str | None]:
    """The labels file darkroom reads (the first of ``layout.LABEL_FILES`` there is) and its
    etag; ``layout.LABELS_APPENDED`` and None when the root has none."""
    for name in layout.LABEL_FILES:
        etag = storage.etag(name)
        if etag is not None:
            return name, etag
    return layout.LABELS_APPENDED, None


def append(storage: Storage, name: str, etag: str | None, labels: dict, source: str) -> None:
    """Appends ``labels`` to the labels file ``name`` if it is still at ``etag`` (absent:
    None). A CSV keeps its bytes and gets rows in its own column order; a Parquet file gets
    rows with the source and time of the import.

    Raises:
        PreconditionFailed: the file changed since ``etag``.
    """
    condition = {"if_match": etag} if etag is not None else {"if_none_match": True}
    if name.endswith(".csv"):
        storage.write_bytes(name, _csv_appended(storage.read_bytes(name), labels), **condition)
        return
    rows = pd.DataFrame(
        {
            "key": list(labels),
            "label": list(labels.values()),
            "source": source,
            "imported_at": datetime.now(UTC).isoformat(),
        }
    )
    if etag is not None:
        before = storage.read_parquet(name)
        rows = pd.concat([before, _same_kind(rows, before, name)], ignore_index=True)
    storage.write_bytes(name, _parquet(rows), **condition)


def _parquet(df: pd.DataFrame) -> bytes:
    """The labels as Parquet bytes. (``Storage.write_parquet`` takes no write condition.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def _csv_appended(raw: bytes, labels: dict) -> bytes:
    """``raw`` (a CSV with a header) with one row per label, in the header's column order."""
    text = raw.decode("utf-8-sig")
    header = next(csv.reader(io.StringIO(text)), ["key", "label"])
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, restval="", lineterminator="\n")
    writer.writerows({"key": k, "label": v} for k, v in labels.items())
    sep = "" if not text or text.endswith("\n") else "\n"
    return raw + (sep + out.getvalue()).encode("utf-8")


def _same_kind(rows: pd.DataFrame, before: pd.DataFrame, name: str) -> pd.DataFrame:
    """New rows whose labels are of the file's kind: a file of whole-number labels gets
    whole numbers (a mix would refuse the whole file, see ``data.labels``)."""
    if not pd.api.types.is_integer_dtype(before["label"]):
        return rows
    bad = [v for v in rows["label"] if not v.lstrip("-").isdigit()]
    if bad:
        raise ValueError(
            f"{name} holds whole-number labels and {bad[0]!r} is not one: write the file's "
            "labels as text first, or give the class a number"
        )
    return rows.assign(label=rows["label"].astype(before["label"].dtype))
