"""What the labeling tests share: a champion and its prediction rows in a real storage root, and
a check of a queue's files against Label Studio's import format."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from darkroom import layout
from darkroom.registry.pointer import Champion
from darkroom.storage import Storage
from tests.conftest import png_bytes

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "label-studio"
CLASSES = ("cat", "dog", "fox")


def fixture(name: str, root_uri: str | None = None) -> bytes:
    """A Label Studio export of tests/fixtures/label-studio; its pictures moved under
    ``root_uri`` when given (they name s3://my-bucket/root)."""
    text = (FIXTURES / name).read_text()
    if root_uri is not None:  # JSON_MIN escapes its slashes
        text = text.replace("s3://my-bucket/root", root_uri)
        text = text.replace("s3:\\/\\/my-bucket\\/root", root_uri.replace("/", "\\/"))
    return text.encode()


def make_champion(storage: Storage, version: str = "v1", classes=CLASSES) -> str:
    """The champion pointer and its model.json, as the registry writes them (no weights)."""
    storage.write_json(layout.version(version, "model.json"), {"classes": list(classes)})
    storage.write_json(layout.CHAMPION, Champion(version=version).as_dict())
    return version


def put_images(storage: Storage, keys) -> dict[str, str]:
    """A real small PNG at each key; key -> etag."""
    return {k: storage.put_source_object(k, png_bytes(10 + i % 200)) for i, k in enumerate(keys)}


def write_predictions(
    storage: Storage,
    version: str,
    probs: dict[str, list[float]],
    classes=CLASSES,
    embeddings: dict[str, list[float]] | None = None,
    chunk: str = "c1",
    etags: dict[str, str] | None = None,
) -> None:
    """A predictions file as scoring writes it, top-3 per image; with ``embeddings``, the
    columns scoring adds with them (unfamiliar, knn_distance, embedding)."""
    rows = []
    for key, p in probs.items():
        order = np.argsort(-np.asarray(p), kind="stable")
        rows.append(
            {
                "key": key,
                "etag": (etags or {}).get(key) or storage.etag(key),
                "label": classes[order[0]],
                "confidence": np.float32(p[order[0]]),
                "low_confidence": bool(p[order[0]] < 0.5),
                "topk_labels": [classes[i] for i in order],
                "topk_probs": [np.float32(p[i]) for i in order],
                "model_version": version,
                "scored_at": pd.Timestamp(datetime.now(UTC)),
                "status": "ok",
                "error": "",
            }
        )
        if embeddings is not None:
            rows[-1] |= {
                "unfamiliar": False,
                "knn_distance": 0.1,
                "embedding": np.asarray(embeddings[key], np.float32),
            }
    storage.write_parquet(layout.predictions(version, chunk), pd.DataFrame(rows))


def check_import_file(tasks, config_xml: str) -> None:
    """Asserts that ``tasks`` is a Label Studio import file for the labeling config: a list of
    tasks with data.image, and predictions whose result items are choices of the config's
    Choices control, on its Image object."""
    view = ET.fromstring(config_xml)
    (image,) = view.findall("Image")
    (choices,) = view.findall("Choices")
    assert image.get("value") == "$" + image.get("name")
    assert choices.get("toName") == image.get("name")
    allowed = {c.get("value") for c in choices.findall("Choice")}
    assert isinstance(tasks, list) and tasks
    for task in tasks:
        assert isinstance(task["data"][image.get("name")], str)
        assert task["predictions"]
        for prediction in task["predictions"]:
            assert isinstance(prediction["model_version"], str) and prediction["model_version"]
            assert 0.0 <= prediction["score"] <= 1.0
            for item in prediction["result"]:
                assert item["type"] == "choices"
                assert item["from_name"] == choices.get("name")
                assert item["to_name"] == image.get("name")
                assert set(item["value"]["choices"]) <= allowed
