"""The optional labels file at the root (``labels.parquet`` or ``labels.csv``, columns key and
label): label overrides for images under ``labeled/``, labels of images under ``incoming/``
(people's answers, which ``darkroom import-labels`` appends), and what is wrong with them.

A labels file is the user's word, so darkroom never settles a doubt in it on its own: a key
given two labels is excluded (status "conflicting_label_file"), a key naming no object is
reported (status "missing_object"), and a label column that mixes kinds of value, or spells
one number two ways ("1" and "1.0"), refuses the whole file. Which of 1, "1" and 1.0 the
user meant is a guess, and a wrong guess trains a model on split or merged classes; the
producer of the file is the one to fix it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import pandas as pd

from darkroom import layout
from darkroom.storage import Storage

CONFLICT = "conflicting_label_file"
MISSING = "missing_object"
LABEL_KINDS = ({"str"}, {"int"})  # what a label column may hold: text, or whole numbers


@dataclass
class LabelFile:
    """What a labels file says: unambiguous labels, and keys given more than one."""

    name: str = ""  # the file read; "" when there is none
    labels: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # key -> distinct labels

    def problems(self) -> dict[str, tuple[str, str]]:
        """Key -> (status, error) for images whose label the file leaves in doubt."""
        return {k: (CONFLICT, self._conflict(k)) for k in self.conflicts}

    def _conflict(self, key: str) -> str:
        labels = ", ".join(map(repr, self.conflicts[key]))
        return f"{self.name} gives this key different labels ({labels}): keep one row"

    def missing(self, present: Collection[str]) -> list[dict[str, str]]:
        """Report rows (key, label, status, error) for keys that name no object."""
        rows = []
        for key in sorted((self.labels.keys() | self.conflicts.keys()) - set(present)):
            under = layout.INCOMING if key.startswith(layout.INCOMING) else layout.LABELED
            error = f"{self.name} labels this key but there is no such object under {under}"
            if key in self.conflicts:
                error += f"; {self._conflict(key)}"
            rows.append(
                {"key": key, "label": self.labels.get(key, ""), "status": MISSING, "error": error}
            )
        return rows

    def keys_under(self, prefix: str) -> list[str]:
        """The keys the file names (labelled or in conflict) under ``prefix``, sorted."""
        return sorted(k for k in self.labels.keys() | self.conflicts.keys() if k.startswith(prefix))


def read_labels(storage: Storage) -> LabelFile:
    """The first labels file found (``layout.LABEL_FILES`` order); empty when there is none.

    Raises:
        DatasetError: the file lacks the key or label column, or its labels mix kinds.
    """
    for name in layout.LABEL_FILES:
        if not storage.exists(name):
            continue
        if name.endswith(".parquet"):
            df = storage.read_parquet(name)
        else:  # text as written: a class named "NA" or "None" is no blank cell
            df = storage.read_csv(name, dtype=str, keep_default_na=False)
        return parse_labels(df, storage.url(name))
    return LabelFile()


def parse_labels(df: pd.DataFrame, name: str) -> LabelFile:
    """A labels file's rows as a LabelFile; ``name`` says where they came from in messages."""
    if not {"key", "label"} <= set(df.columns):
        _refuse(f"{name} needs the columns 'key' and 'label'; it has {list(df.columns)}")
    pairs = zip(df["key"].tolist(), df["label"].tolist(), strict=True)  # Python values
    rows = [(k, v) for k, v in pairs if not _blank(k, v)]
    labels = label_text([v for _, v in rows], name)
    given: dict[str, set[str]] = defaultdict(set)
    for (key, _), label in zip(rows, labels, strict=True):
        given[layout.labeled_key(str(key))].add(label)
    out = LabelFile(name=name)
    for key, found in sorted(given.items()):
        if len(found) == 1:
            out.labels[key] = found.pop()
        else:
            out.conflicts[key] = sorted(found)
    return out


def label_text(values: list, name: str) -> list[str]:
    """Labels as class names: text as written, whole numbers in decimal (as a folder named
    ``3`` is class "3").

    Raises:
        DatasetError: the column holds other kinds (float, bool...) or a mix of kinds.
    """
    kinds = Counter(type(v).__name__ for v in values)
    if kinds and set(kinds) not in LABEL_KINDS:
        found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        _refuse(
            f"the label column of {name} mixes kinds of value or holds non-text ({found}): "
            "write every label as text, one spelling per class (a whole-number column read "
            "with blank cells arrives as float)"
        )
    return [str(v) for v in values]


def check_spellings(file: LabelFile, folder_labels: Iterable[str]) -> None:
    """Refuses a labels file whose labels spell one number two ways, between themselves or
    with a class folder ("1" and "1.0" would train as two classes).

    Raises:
        DatasetError: naming the spellings found.
    """
    ours = set(file.labels.values()) | {v for vs in file.conflicts.values() for v in vs}
    by_value: dict[float, set[str]] = defaultdict(set)
    for label in ours | set(folder_labels):
        try:
            by_value[float(label)].add(label)
        except ValueError:
            continue
    clashes = [sorted(s) for s in by_value.values() if len(s) > 1 and s & ours]
    if clashes:
        shown = "; ".join(" and ".join(map(repr, c)) for c in sorted(clashes))
        _refuse(
            f"{file.name} spells one class several ways ({shown}): they would train as "
            "different classes; write each class one way, as its folder name is written"
        )


def _blank(key, label) -> bool:
    """A row with no key or no label is no override (the folder's label stands)."""
    return any(v is None or (isinstance(v, float) and v != v) or v == "" for v in (key, label))


def _refuse(message: str):

    raise DatasetError(message)


class DatasetError(ValueError):
    """The labeled data cannot be trained on as it is; the message says what to fix."""
