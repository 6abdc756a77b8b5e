"""darkroom.layout: every storage key is built by it, as the documented layout says."""

from __future__ import annotations

from darkroom import layout


def test_key_builders_follow_the_documented_layout():
    assert layout.version("v1", "model.json") == "models/v1/model.json"
    assert layout.fold("v1", 3, "fold.json") == "models/v1/folds/3/fold.json"
    assert layout.fold("v1", 5, "fold.json", refit=True) == "models/v1/refit/fold.json"
    assert layout.predictions("v1", "abc") == "predictions/v1/abc.parquet"
    assert layout.predictions("v1") == "predictions/v1/"
    assert layout.index_snapshot("s") == "index/s.parquet"
    assert layout.quarantine("run-1") == "reports/quarantine/run-1.parquet"
    assert layout.version_of("models/v1/model.json") == "v1"
    assert layout.version_of("models/v1/folds/0/model.json") is None
    assert layout.label_from_key("labeled/cat/a/b.jpg") == "cat"
    assert layout.label_from_key("labeled/top.jpg") is None
    assert layout.labeled_key("cat/1.jpg") == layout.labeled_key("labeled/cat/1.jpg")
