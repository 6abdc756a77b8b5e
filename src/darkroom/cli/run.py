"""The commands that run work: the demo, retrain and score (through the Prefect flows, so runs
show in the Prefect UI), the learning-rate range test and serve."""

from __future__ import annotations

import json
import os

from darkroom.cli import tempserver
from darkroom.cli.commands import arg, command
from darkroom.cli.flags import config_from_args
from darkroom.config import RetrainConfig, RuntimeConfig, ScoreConfig
from darkroom.storage import open_storage


def _prefect() -> None:
    """Readies Prefect for a command that runs flows. Flows are imported inside the commands
    that run them: the core and the quick commands never load Prefect."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from tasks.deployments import settings_without

    tempserver.confirm(settings_without)  # if wanted


@command(
    "demo-data",
    "write the scikit-learn digits as demo images",
    args=[arg("--limit", type=int, help="write only the first N digits")],
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
    _prefect()
    from flows import retrain as flows

    print(json.dumps(flows.brief(flows.nightly_retrain(config)), indent=2))
    return 0


@command(
    "score",
    "score incoming images with the champion",
    (ScoreConfig,),
    config_file=True,
    flows=True,
    args=[
        arg(
            "--rescore",
            action="store_true",
            help="score every image the champion has not scored (not only new ones)",
        )
    ],
)
def cmd_score(a) -> int:
    config = config_from_args(ScoreConfig, a)
    _readable(config.storage, "score")
    _prefect()
    from flows.score import score_new_images

    result = score_new_images(config, rescore=a.rescore)
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    return 0


@command(
    "serve",
    "serve the deployments with the Prefect UI (make ui)",
    only=("storage", "cache_dir"),
    args=[
        arg(
            "--port",
            type=int,
            default=4200,
            help="port of the local Prefect server (127.0.0.1) started when none runs there; ignored when PREFECT_API_URL names a server (default: 4200)",
        ),
        arg("--timezone", help="timezone of the schedules (default: prefect.yaml's)"),
        arg(
            "--watch-every",
            type=float,
            help="seconds between watch-incoming runs (default: prefect.yaml's)",
        ),
        arg(
            "--demo",
            action="store_true",
            help="train nightly-retrain with the demo's config (minutes on a CPU)",
        ),
    ],
)
def cmd_serve(a) -> int:
    _prefect()
    from darkroom.cli.serve import serve

    return serve(
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
    args=[arg("--steps", type=int, default=100, help="optimizer steps at most (default: 100)")],
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
    args=[arg("--epochs", type=int, help="override the demo's epochs")],
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
    _prefect()
    from flows.retrain import nightly_retrain
    from flows.score import score_new_images

    r = nightly_retrain(RetrainConfig(**shared, storage=storage.uri, train=train))
    s = score_new_images(ScoreConfig(**shared, storage=storage.uri))
    print(report(storage, r, s))
    return 0
