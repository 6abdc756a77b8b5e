"""The label-queue flow on Prefect's test server: it writes the queue and shows it as an
artifact on the run's page."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from darkroom import layout
from darkroom.config import LabelQueueConfig
from flows.label_queue import label_queue
from tests.labeling_helpers import make_champion, put_images, write_predictions


async def _artifact(key: str):
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1
        )
    return found[0] if found else None


def test_the_flow_writes_the_queue_and_its_artifact(local_storage):
    make_champion(local_storage)
    keys = [f"incoming/{i}.png" for i in range(6)]
    put_images(local_storage, keys)
    write_predictions(
        local_storage, "v1", {k: [0.5, 0.3 + i / 100, 0.2] for i, k in enumerate(keys)}
    )
    result = label_queue(LabelQueueConfig(storage=local_storage.uri, n=4))
    assert result.queued == 4 and result.version == "v1"
    assert len(local_storage.read_json(result.files["json"])) == 4
    assert {o.key for o in local_storage.list(layout.LABEL_QUEUE)} == set(result.files.values())
    artifact = asyncio.run(_artifact("label-queue"))
    assert artifact is not None and result.files["json"] in artifact.data
