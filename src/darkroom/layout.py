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
# The scoring ledger (darkroom.scoring.ledger): which (key, etag, version) the predictions hold.
LEDGER = "ledger/"
LEDGER_PARTS = "ledger/parts/"
LEDGER_MERGED = "ledger/merged/"
COMPACTIONS = "ledger/compactions/"
DEMO_TRUTH = "demo/incoming_truth.csv"


def index_snapshot(snapshot: str) -> str:
    return f"{INDEX}{snapshot}.parquet"


def lease(name: str) -> str:
    """The lease that keeps a second ``name`` run (retrain, score) off the same root."""
    return f"leases/{name}.json"


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


def label_issues(version_id: str) -> str:
    return f"{REPORTS}label_issues/{version_id}.parquet"


def lr_finder(snapshot: str, fingerprint: str, ext: str) -> str:
    return f"{REPORTS}lr_finder/{snapshot[:8]}-{fingerprint[:8]}.{ext}"


def labeled_key(key: str) -> str:
    """A labels-file key as a storage key (the file may omit the ``labeled/`` prefix)."""
    return key if key.startswith(LABELED) else LABELED + key


def label_from_key(key: str) -> str | None:
    """The class of ``labeled/<class>/<any/path>``: its first folder (None at the top)."""
    parts = key[len(LABELED) :].split("/")
    return parts[0] if len(parts) > 1 else None
