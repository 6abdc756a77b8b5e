"""The ``darkroom`` command line.

``retrain`` and ``score`` run the Prefect flows (so runs show in the Prefect UI when
PREFECT_API_URL points at a server, else on Prefect's temporary local server). Their flags are
made from the flows' pydantic configs (``darkroom.config``), so the CLI, the UI form and the
deployment parameters share one set of fields and defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import darkroom
from darkroom import layout
from darkroom.cli import tempserver
from darkroom.cli.flags import GATE_FIELDS, add_config_flags, config_from_args, explain
from darkroom.config import RetrainConfig, RuntimeConfig, ScoreConfig
from darkroom.ops import stopping
from darkroom.registry import pointer
from darkroom.storage import open_storage


def _flows(name: str):
    """``flows.<name>``, imported on demand: the core and its quick commands never load Prefect."""
    import importlib

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    module = importlib.import_module(f"flows.{name}")
    tempserver.confirm(importlib.import_module("tasks.deployments").settings_without)  # if wanted
    return module


COMMANDS: dict[str, dict] = {}  # ---- commands ----------------------------------------------


def command(
    name: str,
    help: str,
    configs=(RuntimeConfig,),
    only=None,
    config_file=False,
    args=(),
    flows=False,
):
    """Registers ``darkroom <name>``: flags from ``configs`` (the fields in ``only``, when
    given), ``--config FILE`` with ``config_file``, plus ``args`` ((flags, keywords) pairs);
    ``flows``: it runs Prefect flows (darkroom.cli.tempserver starts a server as it starts)."""

    def register(func):
        COMMANDS[name] = dict(
            help=help,
            func=func,
            configs=configs,
            only=only,
            config_file=config_file,
            args=args,
            flows=flows,
        )
        return func

    return register


def _arg(*flags, **kw) -> tuple:
    return flags, kw


@command(
    "demo-data",
    "write the scikit-learn digits as demo images",
    args=[_arg("--limit", type=int, help="write only the first N digits")],
)
def cmd_demo_data(a) -> int:
    from darkroom.cli.demo import write_demo_data

    storage = open_storage(config_from_args(RuntimeConfig, a).storage)
    counts = write_demo_data(storage, limit=a.limit)
    print(
        f"demo data in {storage.uri}: {counts['labeled']} labeled digits "
        f"under labeled/<digit>/, {counts['incoming']} unlabeled under incoming/"
    )
    return 0


def _readable(uri: str, lease_name: str, labeled: bool = False):
    """The storage root, checked before a flow starts: a root that cannot be read, or a run
    already going there, fails here in one line rather than in a task's traceback."""
    from darkroom.storage.lease import check_free

    storage = open_storage(uri)
    storage.check()
    check_free(storage, lease_name)
    if labeled:
        from darkroom.data.index import require_labeled  # pandas, torch: not for a scoring run

        require_labeled(storage)
    return storage


def _check_pretrained(config: RetrainConfig) -> None:
    from darkroom.model.backbone import check_pretrained  # torch and timm only where training runs

    check_pretrained(config.train)


@command(
    "retrain",
    "sync, index, K-fold train, promote if better",
    (RetrainConfig,),
    config_file=True,
    flows=True,
)
def cmd_retrain(a) -> int:
    config = config_from_args(RetrainConfig, a)
    _readable(config.storage, "retrain", labeled=True)
    _check_pretrained(config)
    flows = _flows("retrain")
    print(json.dumps(flows.brief(flows.nightly_retrain(config)), indent=2))
    return 0


@command(
    "score",
    "score incoming images with the champion",
    (ScoreConfig,),
    config_file=True,
    flows=True,
    args=[
        _arg(
            "--rescore",
            action="store_true",
            help="score every image the champion has not scored (not only new ones)",
        )
    ],
)
def cmd_score(a) -> int:
    config = config_from_args(ScoreConfig, a)
    _readable(config.storage, "score")
    result = _flows("score").score_new_images(config, rescore=a.rescore)
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    return 0


@command(
    "compact",
    "merge a model version's small prediction files into larger ones",
    only=("storage", "lease_seconds"),
    args=[
        _arg("version", nargs="?", help="the model version (default: the champion)"),
        _arg("--rows", type=int, help="rows per merged file (default: 100000)"),
    ],
)
def cmd_compact(a) -> int:
    from darkroom.scoring.compaction import compact_predictions
    from darkroom.storage.lease import held

    config = config_from_args(RuntimeConfig, a)
    storage = open_storage(config.storage)
    version = a.version or (pointer.read_champion(storage)[0] or {}).get("version")
    if version is None:
        return _fail(f"no champion in {storage.uri}: name the version to compact")
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
    v = champion["version"]
    metrics = storage.read_json(layout.version(v, "metrics.json"), missing_ok=True) or {}
    meta = storage.read_json(layout.version(v, "model.json"), missing_ok=True) or {}
    print(
        f"champion: {v}  ({meta.get('backbone')}, {len(meta.get('classes', []))} classes, "
        f"index {meta.get('index_snapshot')})"
    )
    print(f"  why: {champion.get('reason')}  [{champion.get('action')} at {champion.get('at')}]")
    for m, cv in metrics.get("cv", {}).items():
        if m in ("accuracy", "f1_macro"):
            holdout = metrics["holdout"][m]
            print(f"  CV {m}: {cv['mean']:.4f} ± {cv['std']:.4f}   holdout {m}: {holdout:.4f}")
    hist = pointer.history(storage)
    if hist:
        last = hist[-1]
        print(
            f"last promotion record: {last['action']} {last['version']} at {last['at']} "
            f"(previous: {last.get('previous')})"
        )
    print(f"files: {storage.url(layout.version(v))}")
    return 0


@command(
    "promote",
    "make VERSION the champion (through the gate)",
    (RetrainConfig,),
    only=("storage", "cache_dir", "device", *GATE_FIELDS),
    args=[_arg("version"), _arg("--force", action="store_true", help="skip the gate")],
)
def cmd_promote(a) -> int:
    """Promotes a given version: through the gate on the current holdout unless --force."""
    from darkroom.data.index import read_index
    from darkroom.model.inference import load_version
    from darkroom.registry import promotion

    config = config_from_args(RetrainConfig, a)
    storage = open_storage(config.storage)
    champion, etag = pointer.read_champion(storage)
    if champion and champion["version"] == a.version:
        print(f"{a.version} is already the champion")
        return 0
    load_version(storage, a.version, config.device)  # refuses a missing or tampered model
    if a.force:
        rec = pointer.promote(
            storage,
            a.version,
            expected_etag=etag,
            action="manual-promote",
            reason="manual promotion (--force, gate skipped)",
            previous=champion and champion["version"],
            metrics=pointer.champion_metrics(storage, a.version),
        )
        print(f"champion is now {rec['version']} (was {rec['previous']})")
        return 0
    outcome = promotion.judge(storage, config, read_index(storage).snapshot, a.version)
    print(outcome.decision.rule)
    if not outcome.decision.promote:
        print(f"{a.version} not promoted (use --force to promote anyway)")
        return 1
    outcome.decision.rule = f"manual promotion through the gate: {outcome.decision.rule}"
    promotion.promote_candidate(storage, outcome, action="manual-promote")
    now, _ = pointer.read_champion(storage)
    print(f"champion is now {now['version']} (was {outcome.champion_version})")
    return 0 if outcome.promoted else 1


@command("rollback", "return to the previous champion")
def cmd_rollback(a) -> int:
    rec = pointer.rollback(open_storage(config_from_args(RuntimeConfig, a).storage))
    print(f"rolled back: champion is now {rec['version']} (was {rec['previous']})")
    return 0


@command("history", "every promotion and rollback, oldest first")
def cmd_history(a) -> int:
    records = pointer.history(open_storage(config_from_args(RuntimeConfig, a).storage))
    if not records:
        print("no promotions yet")
    for r in records:
        m = " ".join(f"{k}={v:.4f}" for k, v in (r.get("metrics") or {}).items())
        print(
            f"{r['at']}  {r['action']:<14} {r['version']:<40} previous={r.get('previous')} "
            f"{m}\n    {r['reason']}"
        )
    return 0


@command(
    "serve",
    "serve the deployments with the Prefect UI (make ui)",
    only=("storage", "cache_dir"),
    args=[
        _arg(
            "--port",
            type=int,
            default=4200,
            help="port of the local Prefect server (127.0.0.1) started when none runs there; ignored when PREFECT_API_URL names a server (default: 4200)",
        ),
        _arg("--timezone", help="timezone of the schedules (default: prefect.yaml's)"),
        _arg(
            "--watch-every",
            type=float,
            help="seconds between watch-incoming runs (default: prefect.yaml's)",
        ),
        _arg(
            "--demo",
            action="store_true",
            help="train nightly-retrain with the demo's config (minutes on a CPU)",
        ),
    ],
)
def cmd_serve(a) -> int:
    return _flows("serve").serve(
        port=a.port,
        storage=getattr(a, "storage", None),
        cache_dir=getattr(a, "cache_dir", None),
        timezone=a.timezone,
        watch_every=a.watch_every,
        demo=a.demo,
    )


@command(
    "find-lr",
    "learning-rate range test on the current index",
    (RetrainConfig,),
    config_file=True,
    args=[_arg("--steps", type=int, default=100, help="optimizer steps at most (default: 100)")],
)
def cmd_find_lr(a) -> int:
    """The lr range test on the train rows of the current index (run a retrain first)."""
    from darkroom.training.lr_finder import find_lr

    config = config_from_args(RetrainConfig, a)
    _check_pretrained(config)
    out = find_lr(open_storage(config.storage), config, steps=a.steps)
    lr = out["suggested_lr"]
    print(
        f"suggested lr: {lr:.2e} (loss lowest at {out['min_loss_lr']:.2e})"
        if lr
        else "no suggestion: the test stopped too early (try a smaller --batch-size)"
    )
    print(f"plot: {out['plot']}\nresult: {out['json']}")
    return 0


@command(
    "demo",
    "demo data, retrain, score and a report (make demo)",
    args=[_arg("--epochs", type=int, help="override the demo's epochs")],
    flows=True,
)
def cmd_demo(a) -> int:
    """Demo data if absent, retrain, score, then a report of what was produced."""
    from darkroom.cli.demo import DEMO_TRAIN, has_demo_data, report, write_demo_data

    runtime = config_from_args(RuntimeConfig, a)
    storage = open_storage(runtime.storage)
    if not has_demo_data(storage):
        print(f"wrote demo digits: {write_demo_data(storage)}")
    train = DEMO_TRAIN.model_copy(update={"epochs": a.epochs} if a.epochs else {})
    shared = runtime.model_dump(exclude={"storage"})
    r = _flows("retrain").nightly_retrain(RetrainConfig(**shared, storage=storage.uri, train=train))
    s = _flows("score").score_new_images(ScoreConfig(**shared, storage=storage.uri))
    print(report(storage, r, s))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="darkroom", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"darkroom {darkroom.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, c in COMMANDS.items():
        p = sub.add_parser(name, help=c["help"], description=c["help"])
        for model in c["configs"]:
            add_config_flags(p, model, c["only"])
        if c["config_file"]:
            p.add_argument(
                "--config",
                metavar="FILE",
                help="YAML or TOML file with the config's fields (flags override it)",
            )
        for flags, kw in c["args"]:
            p.add_argument(*flags, **kw)
        p.set_defaults(func=c["func"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and COMMANDS[args.command]["flows"]:  # a process of its own
        tempserver.start_early()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pydantic import ValidationError

    from darkroom.storage import StorageError

    stopping.exit_on_sigterm()
    try:
        return args.func(args)
    except ValidationError as e:
        return _fail(explain(e))
    # ValueError covers bad config values, weights that fail their sha256 check and
    # darkroom.index.DatasetError (not imported here: it would load pandas and torch).
    except (StorageError, FileNotFoundError, pointer.RegistryError, ValueError) as e:
        return _fail(str(e))


def _fail(message: str) -> int:
    """One line on stderr that says what to fix, and exit status 1 (2 is argparse's)."""
    print(f"darkroom: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
