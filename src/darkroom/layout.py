"""Every storage key darkroom reads or writes, in one place (shared/DESIGN.md's layout).

Nothing else spells a key: stages ask this module for paths, and ``Storage`` serialises.
"""

from __future__ import annotations

from datetime import datetime

# The user's sources: darkroom reads them and never writes, moves or deletes anything there.
LABELED = "labeled/"
INCOMING = "incoming/"
LABEL_FILES = ("labels.parquet", "labels.csv")

INDEX = "index/"
INDEX_LATEST = "index/latest.json"
MODELS = "models/"
CHAMPION = "models/champion.json"
PROMOTIONS = "models/promotions/"
PREDICTIONS = "predictions/"
REPORTS = "reports/"
WATCH_STATE = "reports/watch/announced.json"
LABEL_QUEUE = "reports/label_queue/"
# Where import-labels appends people's labels when the root has no labels file yet.
LABELS_APPENDED = LABEL_FILES[0]  # labels.parquet
# The scoring ledger (darkroom.scoring.ledger): which (key, etag, version) the predictions hold.
LEDGER = "ledger/"
LEDGER_PARTS = "ledger/parts/"
LEDGER_MERGED = "ledger/merged/"
COMPACTIONS = "ledger/compactions/"
DEMO_TRUTH = "demo/incoming_truth.csv"


def index_snapshot(snapshot: str) -> str:
    return f"{INDEX}{snapshot}.parquet"


LEASES = "leases/"


def lease(name: str) -> str:
    """The lease that keeps a second ``name`` run (retrain, score) off the same root."""
    return f"{LEASES}{name}.json"


def index_changes(snapshot: str) -> str:
    """What changed in the data since the champion's snapshot, beside the snapshot."""
    return f"{INDEX}{snapshot}.changes.json"


def version(version: str, name: str = "") -> str:
    """``models/<version>/<name>``; the folder itself without ``name``."""
    return f"{MODELS}{version}/{name}"


def member(fold: int, name: str = "model.safetensors") -> str:
    """A fold's file relative to its version folder (model.json names ensemble members so)."""
    return f"folds/{fold}/{name}"


def fold(version_id: str, fold: int, name: str = "", *, refit: bool = False) -> str:
    """``models/<v>/folds/<k>/<name>``, or ``models/<v>/refit/<name>`` for the refit."""
    return version(version_id, f"refit/{name}" if refit else member(fold, name))


# A fold's done mark, and the resume state it leaves once done (``fold``'s names).
FOLD_RECORD = "fold.json"
FOLD_CHECKPOINT = "checkpoint.pt"


def version_folder_of(key: str) -> str | None:
    """The version whose folder holds ``key`` (``models/<version>/...``); None for the
    champion pointer, the promotion log and keys outside models/."""
    if not key.startswith(MODELS) or key.startswith(PROMOTIONS):
        return None
    parts = key[len(MODELS) :].split("/")
    return parts[0] if len(parts) > 1 else None


def fold_folder_of(key: str) -> str | None:
    """The fold's folder (``models/<v>/folds/<k>/`` or ``models/<v>/refit/``) holding
    ``key``; None for other keys."""
    parts = key.split("/")
    if version_folder_of(key) is None:
        return None
    if len(parts) == 5 and parts[2] == "folds" or len(parts) == 4 and parts[2] == "refit":
        return "/".join(parts[:-1]) + "/"
    return None


def snapshot_of(key: str) -> str | None:
    """The snapshot of an ``index/<snapshot>.parquet`` or ``index/<snapshot>.changes.json``
    key (None for index/latest.json and other keys)."""
    name = key.removeprefix(INDEX)
    if name == key or "/" in name:
        return None
    for suffix in (".changes.json", ".parquet"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return None


def version_of(key: str) -> str | None:
    """The version a ``models/<version>/model.json`` key belongs to (None for other keys)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] + "/" == MODELS and parts[2] == "model.json":
        return parts[1]
    return None


def promotion_record(at: datetime, version_id: str) -> str:
    return f"{PROMOTIONS}{at:%Y%m%dT%H%M%S%fZ}-{version_id}.json"


def predictions(version_id: str | None = None, chunk: str | None = None) -> str:
    """``predictions/``, ``predictions/<version>/`` or one chunk's Parquet file."""
    if version_id is None:
        return PREDICTIONS
    return f"{PREDICTIONS}{version_id}/" + (f"{chunk}.parquet" if chunk else "")


def predictions_version(key: str) -> str:
    """The version a ``predictions/<version>/...`` key belongs to."""
    return key.removeprefix(PREDICTIONS).split("/", 1)[0]


def ledger_part(predictions_key: str) -> str:
    """The ledger part of one predictions file: ``ledger/parts/<version>/<file>.parquet``."""
    return LEDGER_PARTS + predictions_key.removeprefix(PREDICTIONS)


def ledger_merged(name: str) -> str:
    return f"{LEDGER_MERGED}{name}.parquet"


def compaction(version_id: str, name: str) -> str:
    """What a compaction of ``version_id``'s predictions merges into ``name``, until it is done."""
    return f"{COMPACTIONS}{version_id}/{name}.json"


def quarantine(run: str) -> str:
    return f"{REPORTS}quarantine/{run}.parquet"


def drift_report(version_id: str, run: str, ext: str = "json") -> str:
    """One scoring run's drift against the version's reference (``run``: the flow run's name,
    or ``day-<YYYY-MM-DD>`` for the runs of one UTC day together)."""
    return f"{REPORTS}drift/{version_id}/{run}.{ext}"


def label_issues(version_id: str) -> str:
    return f"{REPORTS}label_issues/{version_id}.parquet"


def label_issues_version(key: str) -> str | None:
    """The version a ``label_issues`` report belongs to (None for other keys)."""
    prefix, suffix = label_issues("").removesuffix(".parquet"), ".parquet"
    name = key.removeprefix(prefix)
    if name == key or "/" in name or not name.endswith(suffix):
        return None
    return name.removesuffix(suffix)


def lr_finder(snapshot: str, fingerprint: str, ext: str) -> str:
    return f"{REPORTS}lr_finder/{snapshot[:8]}-{fingerprint[:8]}.{ext}"


def labeled_key(key: str) -> str:
    """A labels-file key as a storage key: ``incoming/...`` names an image waiting under
    incoming/ (a person's label, see ``darkroom import-labels``); any other key is under
    ``labeled/``, which the file may omit."""
    return key if key.startswith((LABELED, INCOMING)) else LABELED + key


def label_from_key(key: str) -> str | None:
    """The class of ``labeled/<class>/<any/path>``: its first folder (None at the top, and
    for keys outside labeled/)."""
    if not key.startswith(LABELED):
        return None
    parts = key[len(LABELED) :].split("/")
    return parts[0] if len(parts) > 1 else None


def label_queue(at: datetime, ext: str) -> str:
    """One labeling queue's file: ``reports/label_queue/<time>.<ext>`` (json: the Label Studio
    import file, csv: the same tasks as a table, xml: the labeling config)."""
    return f"{LABEL_QUEUE}{at:%Y%m%dT%H%M%S%fZ}.{ext}"


def label_queue_time(key: str) -> datetime | None:
    """When the queue file ``key`` was written (None for a key ``label_queue`` did not make)."""
    name = key.removeprefix(LABEL_QUEUE).rsplit(".", 1)[0]
    try:
        return datetime.strptime(name + "+0000", "%Y%m%dT%H%M%S%fZ%z")
    except ValueError:
        return None
