"""`darkroom status`, `history`, `promote` and `rollback` on a local folder and on S3 (moto),
and pandas reading the predictions folder as one dataset from both."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from darkroom import layout
from darkroom.cli.main import main
from darkroom.config import ScoreConfig
from darkroom.registry import pointer as registry
from darkroom.scoring.chunks import score_chunk
from darkroom.scoring.plan import pending_chunks
from darkroom.storage import open_storage
from tests.conftest import LEARNS, train_candidate, write_digits

pytestmark = pytest.mark.slow


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_env")["uri"]
    return (tmp_path / "bucket").as_uri()


def _train(uri: str, cache: str, seed: int) -> str:
    return train_candidate(open_storage(uri), cache, LEARNS.model_copy(update={"seed": seed}))


def run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_status_history_promote_rollback(root, tmp_path, capsys):
    storage = open_storage(root)
    cache = str(tmp_path / "cache")
    write_digits(storage, classes=("0", "1", "2"), per_class=30, incoming=9)
    a, b = _train(root, cache, seed=1), _train(root, cache, seed=2)
    common = ["--storage", root, "--cache-dir", cache]

    assert run(capsys, "status", *common)[0] == 1  # no champion yet
    code, out = run(capsys, "promote", a, *common)
    assert code == 0 and "no champion yet" in out, out
    code, out = run(capsys, "promote", b, *common, "--min-delta", "2")  # impossible margin
    assert code == 1 and "not promoted" in out
    assert registry.read_champion(storage)[0].version == a
    code, out = run(capsys, "promote", b, *common, "--force")
    assert code == 0 and f"champion is now {b}" in out

    code, out = run(capsys, "status", *common)
    assert code == 0 and f"champion: {b}" in out and "(force: gate skipped)" in out
    code, out = run(capsys, "rollback", *common)
    assert code == 0 and f"champion is now {a}" in out
    assert registry.read_champion(storage)[0].version == a
    code, out = run(capsys, "history", *common)
    lines = [ln for ln in out.splitlines() if re.match(r"\d{4}-\d\d-\d\dT", ln)]
    assert code == 0 and [ln.split()[1:3] for ln in lines] == [
        ["manual-promote", a],
        ["manual-promote", b],
        ["rollback", a],
    ]
    code, out = run(capsys, "rollback", *common)  # nothing before the first champion
    assert code == 1 and "nothing to roll back to" in out

    # a tampered model is refused, even with --force, and the pointer does not move
    key = layout.version(b, "model.safetensors")
    storage.write_bytes(key, storage.read_bytes(key)[:-4] + b"\0\0\0\0")
    code, out = run(capsys, "promote", b, *common, "--force")
    assert code == 1 and "sha256" in out
    assert registry.read_champion(storage)[0].version == a
    assert len(registry.history(storage)) == 3

    # predictions read back as one dataset, straight from the root URI
    config = ScoreConfig(storage=root, cache_dir=cache, device="cpu")
    for c in pending_chunks(storage, a, chunk_size=4).chunks:
        score_chunk(storage, config, a, c)
    df = pd.read_parquet(f"{root}/predictions/{a}/")
    assert len(df) == 9 and set(df["model_version"]) == {a}
    assert json.loads(storage.read_text("models/champion.json"))["version"] == a
