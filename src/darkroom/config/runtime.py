"""Where and how a flow runs: the storage root, the cache, devices and limits. Nothing here
changes results."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    """Which storage root a flow works on (the watcher needs no more than this)."""

    model_config = ConfigDict(extra="forbid")

    storage: str | None = Field(
        None,
        description="Storage root: file://PATH or s3://BUCKET/PREFIX. Empty: $DARKROOM_STORAGE "
        "where the run executes, else file://./data/bucket.",
    )


class RuntimeConfig(StorageConfig):
    """Where and how to run; does not change results."""

    cache_dir: str | None = Field(
        None,
        description="Local cache of synced images (default: $DARKROOM_CACHE or "
        "~/.cache/darkroom/<root hash>).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1...")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    download_concurrency: int = Field(
        32,
        ge=1,
        description="Parallel downloads from S3 (one GET each) and the size of the S3 client's "
        "connection pool; a local root is read in place, with no threads.",
    )
    lease_seconds: int = Field(
        300,
        ge=10,
        description="A run holds a lease on the storage root (renewed every third of this), so "
        "a second retrain or scoring run there stops; a killed run's lease expires after this.",
    )
    loader_timeout_seconds: float = Field(
        300,
        gt=0,
        description="A DataLoader worker that returns no batch for this long fails the epoch "
        "(the fold's retry resumes from its checkpoint).",
    )
    task_runner: Literal["threads", "ray"] = Field(
        "threads",
        description="Where folds and scoring chunks run: threads (Prefect's thread pool on "
        "this machine) or ray (a Ray cluster through prefect-ray: one GPU per fold, a share of "
        "one per scoring chunk).",
    )
    ray_address: str | None = Field(
        None,
        description="The Ray cluster for task_runner=ray (ray://HOST:10001, or auto). Empty: "
        "$RAY_ADDRESS where the flow runs, else a local Ray instance started for the run.",
    )
    max_image_pixels: int = Field(
        178_956_970,
        ge=1,
        description="Images with more pixels (read from the header, before decoding) are "
        "quarantined (index) or rejected (scoring); Pillow's decompression-bomb limit.",
    )

    def cache_path(self, root_uri: str) -> Path:
        """The local cache of the images of the storage root ``root_uri``: ``cache_dir``, else
        one folder per root under $DARKROOM_CACHE (default ~/.cache/darkroom)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = Path(os.environ.get("DARKROOM_CACHE", Path.home() / ".cache" / "darkroom"))
        return base / hashlib.sha256(root_uri.encode()).hexdigest()[:16]


# Whole-run limits (Prefect sets a flow's timeout where the flow is defined, not per run);
# the per-task limits are config fields below.
RETRAIN_TIMEOUT_SECONDS = 24 * 3600
SCORE_TIMEOUT_SECONDS = 12 * 3600
WATCH_TIMEOUT_SECONDS = 15 * 60
