"""The model card: Hugging Face's own reader finds the holdout metrics metrics.json holds, and
the body names the data, the recipe, calibration, label issues and the gate's decision."""

from __future__ import annotations

from huggingface_hub import ModelCard

from darkroom.registry.card import CardFacts, render_card
from darkroom.registry.evaluation import CandidateMetrics

HOLDOUT = {
    "accuracy": 0.9792,
    "f1_macro": 0.9788,
    "precision_macro": 0.98,
    "recall_macro": 0.9791,
    "log_loss": 0.0712,
    "per_class_accuracy": {"0": 1.0, "1": 0.95},
    "per_class_support": {"0": 14, "1": 20},
    "confusion_matrix": [[14, 0], [1, 19]],
}


def _facts(**kw) -> CardFacts:
    facts = dict(
        version="v1",
        meta={
            "backbone": "resnet18",
            "classes": ["0", "1"],
            "index_snapshot": "snap-1",
            "train_config": {"backbone": "resnet18", "epochs": 8, "lr": 0.002},
        },
        metrics=CandidateMetrics(cv={"accuracy": {"mean": 0.99, "std": 0.005}}, holdout=HOLDOUT),
        decision={"promote": True, "rule": "first champion: beats the majority class"},
        calibration={
            "temperature": 1.7,
            "reason": "holdout NLL fell",
            "oof_before": {"ece": 0.05, "nll": 0.2, "brier": 0.05},
            "oof_after": {"ece": 0.01, "nll": 0.1, "brier": 0.04},
        },
        label_issues={
            "count": 3,
            "share": 0.02,
            "top": [
                {
                    "key": "labeled/1/a.png",
                    "given_label": "1",
                    "suggested_label": "0",
                    "self_confidence": 0.01,
                }
            ],
        },
        class_counts={"0": 120, "1": 130},
        holdout_size=34,
        plots=["confusion.png", "reliability.png"],
    )
    return CardFacts(**{**facts, **kw})


def test_huggingface_reads_the_holdout_metrics_of_metrics_json(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(render_card(_facts()))
    card = ModelCard.load(path)
    assert card.data.library_name == "timm"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.model_name == "v1"
    found = {r.metric_type: r.metric_value for r in card.data.eval_results}
    expected = {k: v for k, v in HOLDOUT.items() if isinstance(v, float)}
    assert found == expected
    assert {r.dataset_split for r in card.data.eval_results} == {"holdout"}


def test_the_body_reads_in_a_minute():
    text = render_card(_facts())
    for heading in (
        "## Data",
        "## Recipe",
        "## Metrics",
        "## Calibration",
        "## Per class",
        "## Label issues",
        "## Decision",
        "## Plots",
    ):
        assert heading in text, heading
    assert "Temperature 1.700" in text and "0.0500 → 0.0100" in text
    assert "| accuracy | 0.9900 ± 0.0050 | 0.9792 |" in text
    assert "`labeled/1/a.png` | 1 | 0" in text
    assert "**promoted**" in text
    assert "![Confusion matrix (out-of-fold)](confusion.png)" in text
    assert "curves.png" not in text  # only the plots the folder holds


def test_a_version_without_calibration_or_decision_says_so():
    text = render_card(_facts(calibration=None, decision=None, label_issues=None))
    assert "No temperature was fitted" in text and "Not judged by the gate yet" in text
    assert "## Label issues" not in text


def test_a_class_without_holdout_images_shows_a_dash():
    holdout = {**HOLDOUT, "per_class_accuracy": {"0": 1.0, "1": None}}
    text = render_card(_facts(metrics=CandidateMetrics(holdout=holdout)))
    assert "| 1 | 130 | 20 | – |" in text
