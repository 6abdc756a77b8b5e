"""The ``darkroom`` command line.

``retrain`` and ``score`` run the Prefect flows (so runs show in the Prefect UI when
PREFECT_API_URL points at a server, else on Prefect's temporary local server).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from darkroom import registry
from darkroom.config import RetrainConfig, ScoreConfig, TrainConfig
from darkroom.storage import default_storage_uri, open_storage


def _flows(name: str):
    """Imports ``flows.<name>``: from the working directory, else from the source checkout."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "flows" / f"{name}.py").is_file() and str(root) not in sys.path:
            sys.path.insert(0, str(root))
            break
    try:
        return importlib.import_module(f"flows.{name}")
    except ModuleNotFoundError as e:
        raise SystemExit(
            f"cannot import flows.{name} ({e}): run darkroom from the repository "
            "root, or put it on PYTHONPATH"
        ) from None


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        default=default_storage_uri(),
        help="file://PATH or s3://BUCKET/PREFIX (default: $DARKROOM_STORAGE or "
        "file://./data/bucket)",
    )
    p.add_argument("--cache-dir", help="local cache of synced images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")


def _train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--backbone", default=d.backbone, help="any timm model name")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--folds", type=int, default=d.folds)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-min", type=float, default=d.lr_min)
    p.add_argument("--augment", choices=["soft", "no-flip", "none"], default=d.augment)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pretrained", action="store_true", help="start from pretrained weights")
    p.add_argument(
        "--pretrained-file", help="backbone weights to start from: a local path or a storage URI"
    )
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=d.optimizer)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--freeze-backbone-epochs",
        type=int,
        default=d.freeze_backbone_epochs,
        help="train only the new head for this many epochs first",
    )
    p.add_argument(
        "--early-stopping-patience",
        type=int,
        default=d.early_stopping_patience,
        help="epochs without a lower validation loss before stopping (0: never)",
    )
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--class-weights", choices=["none", "balanced"], default=d.class_weights)
    p.add_argument("--mixup-prob", type=float, default=d.mixup_prob)
    p.add_argument("--cutmix-prob", type=float, default=d.cutmix_prob)
    p.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps)
    p.add_argument(
        "--mixed-precision",
        choices=["auto", "bf16", "fp16", "off"],
        default=d.mixed_precision,
        help="CUDA only",
    )
    p.add_argument(
        "--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW on CUDA"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model on CUDA")
    p.add_argument(
        "--final-model", choices=["best_fold", "ensemble", "refit"], default=d.final_model
    )
    p.add_argument("--force", action="store_true", help="train even if nothing changed")


def _gate_args(p: argparse.ArgumentParser) -> None:
    d = RetrainConfig()
    p.add_argument(
        "--metric",
        choices=["accuracy", "f1_macro"],
        default=TrainConfig().metric,
        help="the gate's primary metric",
    )
    p.add_argument(
        "--min-delta",
        type=float,
        default=d.min_delta,
        help="promote only if the metric improves by at least this",
    )
    p.add_argument(
        "--max-class-recall-drop",
        type=float,
        default=d.max_class_recall_drop,
        help="reject if any class's recall falls by more than this",
    )
    p.add_argument("--tta", action="store_true", help="evaluate with test-time augmentation")


def _score_args(p: argparse.ArgumentParser) -> None:
    d = ScoreConfig()
    p.add_argument("--score-batch-size", type=int, default=d.batch_size)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size)
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score every image the champion has not scored (not only new ones)",
    )
    p.add_argument("--tta", action="store_true", help="average the image and its h-flip")
    p.add_argument(
        "--low-confidence",
        type=float,
        default=d.low_confidence,
        help="flag rows whose top probability is below this",
    )


def train_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        backbone=a.backbone,
        image_size=a.image_size,
        folds=a.folds,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        lr_min=a.lr_min,
        augment=a.augment,
        metric=getattr(a, "metric", TrainConfig().metric),
        seed=a.seed,
        pretrained=a.pretrained or bool(a.pretrained_file),
        pretrained_file=a.pretrained_file,
        optimizer=a.optimizer,
        weight_decay=a.weight_decay,
        freeze_backbone_epochs=a.freeze_backbone_epochs,
        early_stopping_patience=a.early_stopping_patience,
        label_smoothing=a.label_smoothing,
        class_weights=a.class_weights,
        mixup_prob=a.mixup_prob,
        cutmix_prob=a.cutmix_prob,
        grad_accum_steps=a.grad_accum_steps,
        mixed_precision=a.mixed_precision,
        channels_last=a.channels_last,
        compile=a.compile,
        final_model=a.final_model,
    )


def retrain_config(a: argparse.Namespace) -> RetrainConfig:
    train = train_config(a)
    return RetrainConfig(
        storage=a.storage,
        cache_dir=a.cache_dir,
        device=a.device,
        num_workers=a.num_workers,
        train=train,
        force=a.force,
        min_delta=a.min_delta,
        max_class_recall_drop=a.max_class_recall_drop,
        tta=a.tta,
    )


def score_config(a: argparse.Namespace) -> ScoreConfig:
    return ScoreConfig(
        storage=a.storage,
        cache_dir=a.cache_dir,
        device=a.device,
        num_workers=a.num_workers,
        batch_size=a.score_batch_size,
        chunk_size=a.chunk_size,
        topk=a.topk,
        tta=a.tta,
        low_confidence=a.low_confidence,
    )


def cmd_demo_data(a) -> int:
    from darkroom.demo import write_demo_data

    counts = write_demo_data(open_storage(a.storage), limit=a.limit)
    print(
        f"demo data in {open_storage(a.storage).uri}: {counts['labeled']} labeled digits "
        f"under labeled/<digit>/, {counts['incoming']} unlabeled under incoming/"
    )
    return 0


def cmd_retrain(a) -> int:
    result = _flows("retrain").nightly_retrain(retrain_config(a))
    print(json.dumps(_brief_retrain(result), indent=2))
    return 0


def cmd_score(a) -> int:
    result = _flows("score").score_new_images(score_config(a), rescore=a.rescore)
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    return 0


def _brief_retrain(r: dict) -> dict:
    out = {
        "version": r["version"],
        "skipped": r["skipped"],
        "sync": {
            k: r["sync"][k] for k in ("listed", "new", "changed", "removed", "unchanged", "refused")
        },
        "index": r["index"]["summary"],
    }
    if not r["skipped"]:
        out.update(
            promoted=r["promoted"],
            rule=r["decision"]["rule"],
            cv_accuracy=r["cv"]["accuracy"],
            holdout=r["holdout"],
        )
    return out


def cmd_status(a) -> int:
    storage = open_storage(a.storage)
    champion, _ = registry.read_champion(storage)
    if champion is None:
        print(f"no champion in {storage.uri} yet: run `darkroom retrain`")
        return 1
    v = champion["version"]
    metrics = registry.read_json(storage, registry.version_key(v, "metrics.json")) or {}
    meta = registry.read_json(storage, registry.version_key(v, "model.json")) or {}
    print(
        f"champion: {v}  ({meta.get('backbone')}, {len(meta.get('classes', []))} classes, "
        f"index {meta.get('index_snapshot')})"
    )
    print(f"  why: {champion.get('reason')}  [{champion.get('action')} at {champion.get('at')}]")
    cv = metrics.get("cv", {})
    for m in ("accuracy", "f1_macro"):
        if m in cv:
            print(
                f"  CV {m}: {cv[m]['mean']:.4f} ± {cv[m]['std']:.4f}   holdout {m}: "
                f"{metrics['holdout'][m]:.4f}"
            )
    hist = registry.history(storage)
    if hist:
        last = hist[-1]
        print(
            f"last promotion record: {last['action']} {last['version']} at {last['at']} "
            f"(previous: {last.get('previous')})"
        )
    print(f"files: {storage.url(registry.version_key(v))}")
    return 0


def cmd_promote(a) -> int:
    """Promotes a given version: through the gate on the current holdout unless --force."""
    from darkroom.config import cache_dir_for
    from darkroom.evaluation import gate
    from darkroom.scoring import load_version

    storage = open_storage(a.storage)
    champion, etag = registry.read_champion(storage)
    if champion and champion["version"] == a.version:
        print(f"{a.version} is already the champion")
        return 0
    load_version(storage, a.version, a.device)  # refuses a missing or tampered model
    if a.force:
        reason, metrics = (
            "manual promotion (--force, gate skipped)",
            registry.champion_metrics(storage, a.version),
        )
    else:
        rc = RetrainConfig(storage=storage.uri, cache_dir=a.cache_dir)
        d = gate(
            storage.uri,
            str(cache_dir_for(rc)),
            a.version,
            metric=a.metric,
            min_delta=a.min_delta,
            max_class_recall_drop=a.max_class_recall_drop,
            device=a.device,
            tta=a.tta,
        )
        print(d["rule"])
        if not d["promote"]:
            print(f"{a.version} not promoted (use --force to promote anyway)")
            return 1
        reason = f"manual promotion through the gate: {d['rule']}"
        metrics = {k: d["challenger_holdout"][k] for k in ("accuracy", "f1_macro")}
    rec = registry.promote(
        storage,
        a.version,
        expected_etag=etag,
        action="manual-promote",
        reason=reason,
        previous=champion and champion["version"],
        metrics=metrics,
    )
    print(f"champion is now {rec['version']} (was {rec['previous']})")
    return 0


def cmd_rollback(a) -> int:
    rec = registry.rollback(open_storage(a.storage))
    print(f"rolled back: champion is now {rec['version']} (was {rec['previous']})")
    return 0


def cmd_history(a) -> int:
    records = registry.history(open_storage(a.storage))
    if not records:
        print("no promotions yet")
    for r in records:
        m = " ".join(f"{k}={v:.4f}" for k, v in (r.get("metrics") or {}).items())
        print(
            f"{r['at']}  {r['action']:<14} {r['version']:<40} previous={r.get('previous')} "
            f"{m}\n    {r['reason']}"
        )
    return 0


def cmd_serve(a) -> int:
    """Imported lazily like the flows: the core never imports prefect."""
    return _flows("serve").serve(
        port=a.port,
        storage=a.storage,
        cache_dir=a.cache_dir,
        timezone=a.timezone,
        watch_every=a.watch_every,
        demo=a.demo,
    )


def cmd_find_lr(a) -> int:
    """The lr range test on the train rows of the current index (run a retrain first)."""
    from darkroom.config import cache_dir_for
    from darkroom.pipeline import find_lr

    rt = RetrainConfig(storage=a.storage, cache_dir=a.cache_dir)
    out = find_lr(
        rt.storage, str(cache_dir_for(rt)), train_config(a), a.device, a.num_workers, steps=a.steps
    )
    lr = out["suggested_lr"]
    print(
        f"suggested lr: {lr:.2e} (loss lowest at {out['min_loss_lr']:.2e})"
        if lr
        else "no suggestion: the test stopped too early (try a smaller --batch-size)"
    )
    print(f"plot: {out['plot']}\nresult: {out['json']}")
    return 0


def cmd_demo(a) -> int:
    """Demo data if absent, retrain, score, then a report of what was produced."""
    from darkroom.demo import DEMO_TRAIN, has_demo_data, truth_accuracy, write_demo_data
    from darkroom.scoring import read_predictions

    storage = open_storage(a.storage)
    if not has_demo_data(storage):
        counts = write_demo_data(storage)
        print(f"wrote demo digits: {counts}")
    rcfg = RetrainConfig(
        storage=storage.uri,
        cache_dir=a.cache_dir,
        device=a.device,
        train=DEMO_TRAIN.model_copy(update={"epochs": a.epochs} if a.epochs else {}),
    )
    r = _flows("retrain").nightly_retrain(rcfg)
    s = _flows("score").score_new_images(
        ScoreConfig(storage=storage.uri, cache_dir=a.cache_dir, device=a.device)
    )
    champion, _ = registry.read_champion(storage)
    v = champion["version"]
    metrics = registry.read_json(storage, registry.version_key(v, "metrics.json"))
    preds = read_predictions(storage, v)
    acc, n = truth_accuracy(storage, preds)
    sync = r["sync"]
    print("\n==== darkroom demo ====")
    print(
        f"sync labeled/: listed {sync['listed']}, new {sync['new']}, changed {sync['changed']},"
        f" unchanged {sync['unchanged']}, downloaded {sync['downloaded_bytes']} bytes"
    )
    print(
        "retrain: "
        + (
            "skipped, nothing changed since the champion"
            if r["skipped"]
            else f"trained {v}, {'promoted' if r['promoted'] else 'rejected'}"
        )
    )
    cv = metrics["cv"]["accuracy"]
    print(f"champion: {v}")
    print(f"CV accuracy ({len(metrics['folds'])} folds): {cv['mean']:.4f} ± {cv['std']:.4f}")
    print(
        f"holdout accuracy: {metrics['holdout']['accuracy']:.4f} ({metrics['holdout']['n']} images)"
    )
    print(
        f"scoring: {s['incoming']} incoming, {s['already_scored']} already scored, "
        f"{s['scored']} scored now, {s['failed']} failed"
    )
    print(
        f"predictions for {v}: {len(preds)} rows; accuracy vs kept-aside labels: {acc:.4f} "
        f"({n} images)"
    )
    print(f"model files: {storage.url(registry.version_key(v))}")
    print(f"predictions: {storage.url(f'predictions/{v}/')}")
    print(f"champion pointer: {storage.url(registry.CHAMPION)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darkroom", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-data", help="write the scikit-learn digits as demo images")
    _runtime_args(p)
    p.add_argument("--limit", type=int, help="write only the first N digits")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("retrain", help="sync, index, K-fold train, promote if better")
    _runtime_args(p)
    _train_args(p)
    _gate_args(p)
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("score", help="score incoming images with the champion")
    _runtime_args(p)
    _score_args(p)
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("status", help="the champion, its metrics and the last promotion")
    _runtime_args(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("promote", help="make VERSION the champion (through the gate)")
    _runtime_args(p)
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="skip the gate")
    _gate_args(p)
    p.set_defaults(func=cmd_promote)
    p = sub.add_parser("rollback", help="return to the previous champion")
    _runtime_args(p)
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("history", help="every promotion and rollback, oldest first")
    _runtime_args(p)
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("find-lr", help="learning-rate range test on the current index")
    _runtime_args(p)
    _train_args(p)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps at most")
    p.set_defaults(func=cmd_find_lr)
    p = sub.add_parser("demo", help="demo data, retrain, score and a report (make demo)")
    _runtime_args(p)
    p.add_argument("--epochs", type=int, help="override the demo's epochs")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("serve", help="serve the deployments with the Prefect UI (make ui)")
    p.add_argument(
        "--storage",
        default=default_storage_uri(),
        help="storage root of the served flows (default: $DARKROOM_STORAGE or "
        "file://./data/bucket)",
    )
    p.add_argument("--cache-dir", help="base folder of the flows' local caches")
    p.add_argument(
        "--port",
        type=int,
        default=4200,
        help="port of the local Prefect server (127.0.0.1) started when none runs "
        "there; ignored when PREFECT_API_URL names a server",
    )
    p.add_argument("--timezone", help="timezone of the schedules (default: prefect.yaml's)")
    p.add_argument(
        "--watch-every",
        type=float,
        help="seconds between watch-incoming runs (default: prefect.yaml's)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="train nightly-retrain with the demo's config (minutes on a CPU)",
    )
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from darkroom.index import DatasetError
    from darkroom.storage import StorageError

    try:
        return args.func(args)
    # ValueError covers bad config values and weights that fail their sha256 check.
    except (DatasetError, StorageError, FileNotFoundError, registry.RegistryError, ValueError) as e:
        print(f"darkroom: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
