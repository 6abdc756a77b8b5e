"""A version's model card: ``models/<version>/README.md`` in the Hugging Face format.

YAML metadata first (``library_name: timm``, tags, ``pipeline_tag``, the holdout metrics under
``model-index``, so the Hub and ``huggingface_hub.ModelCard`` read them), then a body a
reviewer reads in a minute: data, recipe, cross-validation and holdout metrics, calibration,
the per-class table, label issues found, the gate's decision, and the plots as relative images.
Rendered from what the version folder already holds; nothing here is measured again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from darkroom import layout
from darkroom.data.index import read_index
from darkroom.registry.evaluation import CandidateMetrics, read_metrics
from darkroom.storage import Storage

CARD_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss", "ece")
RECIPE_FIELDS = ("backbone", "pretrained", "image_size", "epochs", "batch_size", "optimizer")
RECIPE_FIELDS += ("lr", "lr_min", "augment", "folds", "final_model", "seed")
PLOTS = {
    "curves.png": "Training curves per fold",
    "confusion.png": "Confusion matrix (out-of-fold)",
    "reliability.png": "Reliability before and after temperature scaling",
    "per_class.png": "Per-class accuracy against training images",
    "label_issues.png": "Images whose label looks wrong (given → suggested)",
    "mistakes.png": "The most confident mistakes (out-of-fold)",
    "lr_finder.png": "Learning-rate range test",
}


@dataclass
class CardFacts:
    """What the card says, as the version folder holds it (JSON-shaped values)."""

    version: str
    meta: dict  # model.json
    metrics: CandidateMetrics
    decision: dict | None = None  # decision.json
    calibration: dict | None = None  # model.json's calibration block
    label_issues: dict | None = None  # count, share (of the training images), top rows
    class_counts: dict[str, int] = field(default_factory=dict)  # training images per class
    holdout_size: int = 0
    plots: list[str] = field(default_factory=list)  # files present beside the card


def render_card(facts: CardFacts) -> str:
    """The whole card: ``---``-fenced YAML metadata, then the Markdown body."""
    meta = yaml.safe_dump(card_metadata(facts), sort_keys=False, allow_unicode=True)
    body = "\n\n".join(part for part in _sections(facts) if part)
    return f"---\n{meta}---\n\n{body}\n"


def card_metadata(facts: CardFacts) -> dict:
    """The card's YAML: the holdout metrics, exactly as metrics.json has them, in model-index."""
    holdout = facts.metrics.holdout
    results = [
        {"type": name, "value": float(holdout[name]), "name": f"holdout {name}"}
        for name in CARD_METRICS
        if isinstance(holdout.get(name), int | float)
    ]
    return {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "darkroom", facts.meta.get("backbone", "")],
        "model-index": [
            {
                "name": facts.version,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {
                            "type": "darkroom-index",
                            "name": str(facts.meta.get("index_snapshot", "")),
                            "split": "holdout",
                        },
                        "metrics": results,
                    }
                ],
            }
        ],
    }


def _sections(facts: CardFacts) -> list[str]:
    return [
        _title(facts),
        _data(facts),
        _recipe(facts),
        _metrics(facts),
        _calibration(facts),
        _per_class(facts),
        _label_issues(facts),
        _decision(facts),
        _plots(facts),
    ]


def _title(facts: CardFacts) -> str:
    m = facts.meta
    return (
        f"# {facts.version}\n\nA `{m.get('backbone')}` image classifier trained by darkroom "
        f"on {len(m.get('classes', []))} classes. Load it with "
        f'`timm.create_model("local-dir:<this folder>", pretrained=True)`.'
    )


def _data(facts: CardFacts) -> str:
    counts = ", ".join(f"{name} {n}" for name, n in facts.class_counts.items())
    return (
        "## Data\n\n"
        f"- index snapshot: `{facts.meta.get('index_snapshot')}`\n"
        f"- classes (index order): {', '.join(facts.meta.get('classes', []))}\n"
        f"- training images per class: {counts or 'not recorded'}\n"
        f"- holdout images: {facts.holdout_size}"
    )


def _recipe(facts: CardFacts) -> str:
    train = facts.meta.get("train_config") or {}
    rows = [f"| {name} | {train[name]} |" for name in RECIPE_FIELDS if name in train]
    lr = facts.meta.get("lr_choice")
    extra = f"\n\nLearning rate: {lr.get('lr'):.3g} ({lr.get('reason')})" if lr else ""
    return "## Recipe\n\n| setting | value |\n|---|---|\n" + "\n".join(rows) + extra


def _metrics(facts: CardFacts) -> str:
    cv, holdout = facts.metrics.cv, facts.metrics.holdout
    rows = []
    for name in CARD_METRICS:
        c = cv.get(name)
        cv_text = f"{c['mean']:.4f} ± {c['std']:.4f}" if isinstance(c, dict) else "–"
        h = holdout.get(name)
        rows.append(f"| {name} | {cv_text} | {_num(h)} |" if h is not None else "")
    table = "\n".join(r for r in rows if r)
    return "## Metrics\n\n| metric | cross-validation | holdout |\n|---|---|---|\n" + table


def _calibration(facts: CardFacts) -> str:
    c = facts.calibration
    if not c:
        return "## Calibration\n\nNo temperature was fitted (confidences are raw softmax)."
    rows = []
    for where in ("oof", "holdout"):
        before, after = c.get(f"{where}_before"), c.get(f"{where}_after")
        if before and after:
            rows.append(
                f"| {where} | {before['ece']:.4f} → {after['ece']:.4f} | "
                f"{before['nll']:.4f} → {after['nll']:.4f} | "
                f"{before['brier']:.4f} → {after['brier']:.4f} |"
            )
    return (
        f"## Calibration\n\nTemperature {c['temperature']:.3f} ({c.get('reason', '')}); "
        f"fitted on {c.get('fitted_on', 'out-of-fold predictions')}.\n\n"
        "| where | ECE | NLL | Brier |\n|---|---|---|---|\n" + "\n".join(rows)
    )


def _per_class(facts: CardFacts) -> str:
    holdout = facts.metrics.holdout
    acc = holdout.get("per_class_accuracy") or {}
    support = holdout.get("per_class_support") or {}
    rows = [
        f"| {name} | {facts.class_counts.get(name, '–')} | {support.get(name, '–')} | {_num(a)} |"
        for name, a in acc.items()
    ]
    head = "| class | training images | holdout images | holdout accuracy |\n|---|---|---|---|\n"
    return "## Per class\n\n" + head + "\n".join(rows) if rows else ""


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _label_issues(facts: CardFacts) -> str:
    li = facts.label_issues
    if not li:
        return ""
    rows = [
        f"| `{r['key']}` | {r['given_label']} | {r['suggested_label']} | "
        f"{r['self_confidence']:.3f} |"
        for r in li.get("top", [])[:10]
    ]
    return (
        f"## Label issues\n\n{li['count']} training images look mislabelled ({li['share']:.1%}"
        " of the training images; confident learning on out-of-fold predictions). darkroom "
        "changed none of them: see `reports/label_issues/` and `darkroom label-issues`.\n\n"
        "| image | given | suggested | confidence in given |\n|---|---|---|---|\n" + "\n".join(rows)
    )


def _decision(facts: CardFacts) -> str:
    d = facts.decision
    if not d:
        return "## Decision\n\nNot judged by the gate yet."
    verdict = "promoted" if d.get("promote") else "not promoted"
    return f"## Decision\n\n**{verdict}**: {d.get('rule')}"


def _plots(facts: CardFacts) -> str:
    shown = [
        f"### {PLOTS[name]}\n\n![{PLOTS[name]}]({name})" for name in PLOTS if name in facts.plots
    ]
    return "## Plots\n\n" + "\n\n".join(shown) if shown else ""


def write_card(storage: Storage, version: str) -> str:
    """Renders the version's card from its folder (model.json, metrics.json, decision.json,
    the label-issue report, the plots present) and writes ``models/<version>/README.md``."""
    meta = storage.read_json(layout.version(version, "model.json"))
    rows, classes, _ = read_index(storage, meta["index_snapshot"])
    train = rows[rows["split"] == "train"]
    counts = train["label"].value_counts()
    facts = CardFacts(
        version=version,
        meta=meta,
        metrics=read_metrics(storage, version) or CandidateMetrics(),
        decision=storage.read_json(layout.version(version, "decision.json"), missing_ok=True),
        calibration=meta.get("calibration"),
        label_issues=_label_issue_facts(storage, version, len(train)),
        class_counts={c: int(counts.get(c, 0)) for c in classes},
        holdout_size=int((rows["split"] == "holdout").sum()),
        plots=[name for name in PLOTS if storage.exists(layout.version(version, name))],
    )
    key = layout.version(version, "README.md")
    storage.write_text(key, render_card(facts))
    return key


def _label_issue_facts(storage: Storage, version: str, examined: int) -> dict | None:
    try:
        report = storage.read_parquet(layout.label_issues(version))
    except FileNotFoundError:
        return None  # a version trained before label-issue reports
    share = len(report) / examined if examined else 0.0
    return {"count": len(report), "share": share, "top": report.head(10).to_dict("records")}
