"""Planning a scoring run: which incoming (key, etag) pairs no model has scored, in chunks.

Which pairs are scored comes from the scoring ledger (``darkroom.scoring.ledger``), so planning
never reads the predictions, and needs no torch (the watcher plans too). A chunk's id is a hash
of its pairs, so a rerun of the same chunk writes the same file instead of a duplicate.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from darkroom import layout
from darkroom.data.names import names_an_image
from darkroom.scoring import ledger
from darkroom.storage import Storage


def chunk_id(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, etag in sorted(pairs):
        h.update(f"{key}\x1f{etag}\x1e".encode())
    return h.hexdigest()[:20]


def scored_pairs(storage: Storage, version: str | None) -> set[tuple[str, str]]:
    """(key, etag) pairs that have a prediction row for ``version`` (None: any version), from
    the scoring ledger, as Python objects: for small roots (planning uses ``ledger.scored``)."""
    return ledger.scored(storage, version).pairs()


@dataclass
class ScorePlan:
    """The chunks of one scoring run and the counts behind them."""

    chunks: list[list[tuple[str, str]]]
    incoming: int
    already_scored: int
    to_score: int


@dataclass
class StreamedPlan:
    """The chunks of one scoring run, made while ``incoming/`` is listed (page by page on
    S3): the listing is taken one chunk's worth at a time, looked up in the scoring ledger,
    and a chunk is handed out as soon as it is full, so a run holds the ledger's columns plus
    the chunks in flight, not the whole listing. Counts fill in as it goes.

    New images are those no model version has scored yet; with ``rescore``, every pair that
    ``version`` itself has not scored (older versions' predictions stay as they are).
    """

    storage: Storage
    version: str
    chunk_size: int
    rescore: bool = False
    incoming: int = 0
    already_scored: int = 0

    @property
    def to_score(self) -> int:
        return self.incoming - self.already_scored

    def chunks(self) -> Iterator[list[tuple[str, str]]]:
        # The ledger is read while the listing starts: Parquet decoding releases the GIL.
        with ThreadPoolExecutor(1, thread_name_prefix="darkroom-ledger") as pool:
            version = self.version if self.rescore else None
            reading = pool.submit(ledger.scored, self.storage, version)
            yield from self._chunks(reading)

    def _chunks(self, reading) -> Iterator[list[tuple[str, str]]]:
        listed = (o for o in self.storage.list(layout.INCOMING) if names_an_image(o.key))
        chunk: list[tuple[str, str]] = []
        while batch := [(o.key, o.etag) for o in itertools.islice(listed, self.chunk_size)]:
            scored = reading.result().contains(batch)
            self.incoming += len(batch)
            self.already_scored += sum(scored)
            for pair, seen in zip(batch, scored, strict=True):
                if seen:
                    continue
                chunk.append(pair)
                if len(chunk) == self.chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def pending_chunks(
    storage: Storage, version: str, chunk_size: int, rescore: bool = False
) -> ScorePlan:
    """Every chunk of a ``StreamedPlan`` at once, with its counts (for small roots and tests;
    the scoring flow takes them one at a time)."""
    plan = StreamedPlan(storage, version, chunk_size, rescore)
    chunks = list(plan.chunks())
    return ScorePlan(chunks, plan.incoming, plan.already_scored, plan.to_score)
