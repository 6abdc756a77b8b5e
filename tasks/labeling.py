"""The labeling queue's task: pick the images worth a person's labels and write the queue."""

from __future__ import annotations

from darkroom.config import LabelQueueConfig
from darkroom.monitoring import labeling
from darkroom.storage import open_storage
from tasks.retry import io_task


@io_task(name="build-label-queue")
def build_label_queue(config: LabelQueueConfig) -> labeling.QueueResult:
    """``darkroom.monitoring.labeling.build_queue``. A retry writes a queue of its own (files
    are named by the time): the earlier try's import file was never written, so no image is
    queued twice."""
    return labeling.build_queue(open_storage(config.storage), config)
