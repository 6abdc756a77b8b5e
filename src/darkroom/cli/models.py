"""The commands over the model registry: status, history, promote, rollback, compact."""

from __future__ import annotations

from darkroom import layout
from darkroom.cli.commands import arg, command, fail
from darkroom.cli.flags import GATE_FIELDS, config_from_args
from darkroom.config import RetrainConfig, RuntimeConfig
from darkroom.registry import pointer
from darkroom.registry.evaluation import CandidateMetrics, read_metrics
from darkroom.storage import open_storage


@command(
    "compact",
    "merge a model version's small prediction files into larger ones",
    only=("storage", "lease_seconds"),
    args=[
        arg("version", nargs="?", help="the model version (default: the champion)"),
        arg("--rows", type=int, help="rows per merged file (default: 100000)"),
    ],
)
def cmd_compact(a) -> int:
    from darkroom.scoring.compaction import compact_predictions
    from darkroom.storage.lease import held

    config = config_from_args(RuntimeConfig, a)
    storage = open_storage(config.storage)
    champion, _ = pointer.read_champion(storage)
    version = a.version or (champion.version if champion else None)
    if version is None:
        return fail(f"no champion in {storage.uri}: name the version to compact")
    with held(storage, "score", config.lease_seconds):  # no scoring run meanwhile
        r = compact_predictions(
            storage, version, **({"rows_per_file": a.rows} if a.rows is not None else {})
        )
    print(f"{version}: {r.files_before} prediction files, now {r.files_after}")
    return 0


@command("status", "the champion, its metrics and the last promotion")
def cmd_status(a) -> int:
    storage = open_storage(config_from_args(RuntimeConfig, a).storage)
    champion, _ = pointer.read_champion(storage)
    if champion is None:
        print(f"no champion in {storage.uri} yet: run `darkroom retrain`")
        return 1
    v = champion.version
    metrics = read_metrics(storage, v) or CandidateMetrics()
    meta = storage.read_json(layout.version(v, "model.json"), missing_ok=True) or {}
    print(
        f"champion: {v}  ({meta.get('backbone')}, {len(meta.get('classes', []))} classes, "
        f"index {meta.get('index_snapshot')})"
    )
    print(f"  why: {champion.reason}  [{champion.action} at {champion.at}]")
    for m, cv in metrics.cv.items():
        if m in ("accuracy", "f1_macro"):
            holdout = metrics.holdout[m]
            print(f"  CV {m}: {cv['mean']:.4f} ± {cv['std']:.4f}   holdout {m}: {holdout:.4f}")
    hist = pointer.history(storage)
    if hist:
        last = hist[-1]
        print(
            f"last promotion record: {last.action} {last.version} at {last.at} "
            f"(previous: {last.previous})"
        )
    print(f"files: {storage.url(layout.version(v))}")
    return 0


@command(
    "promote",
    "make VERSION the champion (through the gate)",
    (RetrainConfig,),
    only=("storage", "cache_dir", "device", *GATE_FIELDS),
    args=[
        arg("version"),
        arg("--force", action="store_true", help="skip the gate"),
        arg("--reason", default="", help="why (kept in the promotion record)"),
    ],
)
def cmd_promote(a) -> int:
    """Promotes a given version: through the gate on the current holdout unless --force."""
    from darkroom.registry import manual

    config = config_from_args(RetrainConfig, a)
    storage = open_storage(config.storage)
    try:
        change = manual.promote_version(storage, config, a.version, force=a.force, reason=a.reason)
    except manual.GateRejected as e:
        print(e.rule)
        print(f"{a.version} not promoted (use --force to promote anyway)")
        return 1
    if change.record is None:
        print(f"{a.version} is already the champion")
        return 0
    if change.rule:
        print(change.rule)
    print(f"champion is now {change.champion} (was {change.previous})")
    return 0


@command(
    "rollback",
    "return to the previous champion (or to one the history names)",
    args=[
        arg("--to", dest="to_version", metavar="VERSION", help="a version from the history"),
        arg("--reason", default="", help="why (kept in the promotion record)"),
    ],
)
def cmd_rollback(a) -> int:
    storage = open_storage(config_from_args(RuntimeConfig, a).storage)
    rec = pointer.rollback(storage, a.to_version, a.reason)
    print(f"rolled back: champion is now {rec.version} (was {rec.previous})")
    return 0


@command("history", "every promotion and rollback, oldest first")
def cmd_history(a) -> int:
    records = pointer.history(open_storage(config_from_args(RuntimeConfig, a).storage))
    if not records:
        print("no promotions yet")
    for r in records:
        m = " ".join(f"{k}={v:.4f}" for k, v in r.metrics.items())
        print(f"{r.at}  {r.action:<14} {r.version:<40} previous={r.previous} {m}\n    {r.reason}")
    return 0


@command(
    "label-issues",
    "the training images whose label looks wrong (darkroom changes none)",
    args=[
        arg("version", nargs="?", help="the model version (default: the champion)"),
        arg("--top", type=int, default=20, help="rows to print (default: 20)"),
    ],
)
def cmd_label_issues(a) -> int:
    from darkroom.training.label_report import read_label_issues

    storage = open_storage(config_from_args(RuntimeConfig, a).storage)
    champion, _ = pointer.read_champion(storage)
    version = a.version or (champion.version if champion else None)
    if version is None:
        return fail(f"no champion in {storage.uri}: name the version")
    try:
        report = read_label_issues(storage, version)
    except FileNotFoundError:
        return fail(f"{version} has no label-issue report (trained before darkroom made them)")
    print(f"{len(report)} training images of {version} look mislabelled (most suspect first):")
    for r in report.head(a.top).itertuples():
        print(
            f"{r.rank:>4}  {r.key}  given {r.given_label} -> suggested {r.suggested_label}"
            f"  (p given {r.self_confidence:.3f}, p suggested {r.suggested_confidence:.3f})"
        )
    print(f"report: {storage.url(layout.label_issues(version))}")
    return 0
