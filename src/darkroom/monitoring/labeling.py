"""The labeling queue: which of the champion's scored incoming images to ask people about.

It reads the champion's prediction rows, leaves out images already labeled (in the index or the
labels file) and images still waiting in an earlier queue (one whose links are still valid),
picks with ``darkroom.monitoring.queue`` (uncertainty, diversity over the embeddings, a random
share) and writes ``reports/label_queue/<time>.json`` (Label Studio's import file), ``.csv``
and ``.xml`` (the labeling config). Without embeddings in the rows (predictions scored before
darkroom kept them), it picks by uncertainty and the random share alone, and says so.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from darkroom import layout
from darkroom.config import LabelQueueConfig
from darkroom.data.index import read_index
from darkroom.data.labels import read_labels
from darkroom.monitoring import labelstudio
from darkroom.monitoring.queue import Selection, select
from darkroom.registry import pointer
from darkroom.scoring.chunks import read_predictions
from darkroom.storage import Storage


@dataclass
class QueueResult:
    """What a labeling queue holds, and why the rest was left out.

    Attributes:
        version: The champion whose predictions were queued.
        queued: Images in the queue.
        by_reason: How many were picked as uncertain, how many at random.
        diversity: Whether the picks were spread over embeddings (False: the rows have none).
        candidates: Scored images that could have been queued.
        already_labeled: Scored images left out because they have a label.
        already_queued: Scored images left out because an earlier queue still holds them.
        links: "presigned" (https links valid until ``expires_at``) or "storage URI".
        files: ``json``, ``csv`` and ``xml`` -> the key written (empty when nothing was queued).
    """

    version: str
    queued: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    diversity: bool = False
    candidates: int = 0
    already_labeled: int = 0
    already_queued: int = 0
    links: str = "storage URI"
    expires_at: str | None = None
    files: dict[str, str] = field(default_factory=dict)


def champion_classes(storage: Storage) -> tuple[str, list[str]]:
    """The champion's version and its class names, in index order.

    Raises:
        FileNotFoundError: there is no champion yet.
    """
    champion, _ = pointer.read_champion(storage)
    if champion is None:
        raise FileNotFoundError(f"no champion in {storage.uri} yet: run `darkroom retrain` first")
    meta = storage.read_json(layout.version(champion.version, "model.json"))
    return champion.version, list(meta["classes"])


def scored_rows(storage: Storage, version: str) -> pd.DataFrame:
    """The newest successful prediction of each incoming image that is still there, unchanged
    (same etag as when scored)."""
    rows = read_predictions(storage, version)
    rows = rows[rows["status"] == "ok"].sort_values("scored_at", kind="stable")
    rows = rows.drop_duplicates("key", keep="last")
    current = {o.key: o.etag for o in storage.list(layout.INCOMING)}
    same = [current.get(k) == e for k, e in zip(rows["key"], rows["etag"], strict=True)]
    return rows[np.array(same, dtype=bool)]


def labeled_keys(storage: Storage) -> set[str]:
    """Keys that have a label: the index's rows and the labels file's keys."""
    keys: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        keys |= set(read_index(storage).rows["key"])
    file = read_labels(storage)
    return keys | file.labels.keys() | file.conflicts.keys()


def queued_keys(storage: Storage, now: datetime, expiry_seconds: int) -> set[str]:
    """Keys in the queues written less than ``expiry_seconds`` before ``now`` (older ones'
    links are dead: their unanswered images may be queued again)."""
    since = now - timedelta(seconds=expiry_seconds)
    keys: set[str] = set()
    for obj in storage.list(layout.LABEL_QUEUE):
        at = layout.label_queue_time(obj.key)
        if obj.key.endswith(".json") and at is not None and at >= since:
            keys |= {t["data"]["key"] for t in storage.read_json(obj.key) if "key" in t["data"]}
    return keys


def probabilities(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Each row's calibrated probabilities over ``classes``, from its top-k: the mass the
    top-k leaves is shared evenly by the other classes (margin and least-confident need the
    top two alone; entropy sees the rest as spread out)."""
    column = {c: i for i, c in enumerate(classes)}
    probs = np.zeros((len(rows), len(classes)))
    for r, (names, values) in enumerate(zip(rows["topk_labels"], rows["topk_probs"], strict=True)):
        idx = [column[n] for n in names]
        probs[r, idx] = values
        rest = len(classes) - len(idx)
        if rest:
            others = np.setdiff1d(np.arange(len(classes)), idx)
            probs[r, others] = max(0.0, 1.0 - float(np.sum(values))) / rest
    return probs


def embeddings(rows: pd.DataFrame) -> np.ndarray | None:
    """The rows' reduced embeddings as one matrix; None when any row has none."""
    if "embedding" not in rows.columns or rows["embedding"].isna().any():
        return None
    vectors = [np.asarray(v, dtype=np.float64) for v in rows["embedding"]]
    if not vectors or len({v.shape for v in vectors}) != 1 or vectors[0].size == 0:
        return None
    return np.stack(vectors)


def pick(
    rows: pd.DataFrame, classes: list[str], config: LabelQueueConfig
) -> tuple[Selection, bool]:
    """The selection, and whether it used embeddings. Without them every row sits at one
    point: k-center has nothing to spread, and the picks go by uncertainty alone."""
    emb = embeddings(rows)
    same_point = {} if emb is not None else {"duplicate_radius": 0.0}
    chosen = select(
        probabilities(rows, classes),
        emb if emb is not None else np.zeros((len(rows), 1)),
        config.n,
        strategy=config.strategy,
        random_share=config.random_share,
        candidate_factor=config.candidate_factor,
        seed=config.seed,
        **same_point,
    )
    return chosen, emb is not None


def _why(reason: str, score: float, strategy: str, unfamiliar: bool) -> str:
    text = f"uncertain ({strategy} {score:.3f})" if reason == "uncertain" else reason
    return text + (", unfamiliar" if unfamiliar else "")


def queued_images(
    storage: Storage, rows: pd.DataFrame, chosen: Selection, config: LabelQueueConfig
) -> list[labelstudio.QueuedImage]:
    """The picked rows with a link each and why they were picked."""
    unfamiliar = [False] * len(rows)
    if "unfamiliar" in rows.columns:  # rows scored before darkroom flagged them have none
        unfamiliar = [v is True or v is np.True_ for v in rows["unfamiliar"]]
    out = []
    for i, reason, score in zip(chosen.indices, chosen.reasons, chosen.scores, strict=True):
        row = rows.iloc[i]
        url = storage.presigned_url(row["key"], config.url_expiry_seconds) or storage.url(
            row["key"]
        )
        why = _why(reason, score, config.strategy, unfamiliar[i])
        out.append(
            labelstudio.QueuedImage(row["key"], url, row["label"], float(row["confidence"]), why)
        )
    return out


def build_queue(
    storage: Storage, config: LabelQueueConfig, now: datetime | None = None
) -> QueueResult:
    """Picks the images and writes the queue's three files (none when nothing is waiting)."""
    now = now or datetime.now(UTC)
    version, classes = champion_classes(storage)
    rows = scored_rows(storage, version)
    labeled = rows["key"].isin(labeled_keys(storage))
    queued = rows["key"].isin(queued_keys(storage, now, config.url_expiry_seconds)) & ~labeled
    rows = rows[~labeled & ~queued].reset_index(drop=True)
    result = QueueResult(version, candidates=len(rows))
    result.already_labeled, result.already_queued = int(labeled.sum()), int(queued.sum())
    if not len(rows):
        return result
    chosen, result.diversity = pick(rows, classes, config)
    images = queued_images(storage, rows, chosen, config)
    result.queued = len(images)
    result.by_reason = {r: chosen.reasons.count(r) for r in dict.fromkeys(chosen.reasons)}
    if any(q.url != storage.url(q.key) for q in images):
        result.links = "presigned"
        result.expires_at = (now + timedelta(seconds=config.url_expiry_seconds)).isoformat()
    result.files = write_queue(storage, now, classes, images, version)
    return result


def write_queue(
    storage: Storage, now: datetime, classes: list[str], images, version: str
) -> dict[str, str]:
    """Writes the labeling config, the CSV, then the import file (what later queues read)."""
    files = {ext: layout.label_queue(now, ext) for ext in ("xml", "csv", "json")}
    storage.write_text(files["xml"], labelstudio.labeling_config(classes), if_none_match=True)
    storage.write_text(files["csv"], labelstudio.table(images), if_none_match=True)
    body = json.dumps(labelstudio.tasks(images, version), indent=1)
    storage.write_text(files["json"], body, if_none_match=True)
    return files
