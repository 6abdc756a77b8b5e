"""The commands that ask people for labels and take their answers back: label-queue and
import-labels."""

from __future__ import annotations

from pathlib import Path

from darkroom.cli.commands import arg, command, fail
from darkroom.cli.flags import config_from_args
from darkroom.config import LabelQueueConfig, StorageConfig
from darkroom.storage import open_storage

SHOWN = 10  # refused answers named per kind; the rest are counted


@command(
    "label-queue",
    "write a Label Studio import file of the incoming images most worth a person's labels",
    (LabelQueueConfig,),
    config_file=True,
)
def cmd_label_queue(a) -> int:
    from darkroom.monitoring.labeling import build_queue

    config = config_from_args(LabelQueueConfig, a)
    storage = open_storage(config.storage)
    r = build_queue(storage, config)
    left_out = f"{r.already_labeled} already labeled, {r.already_queued} in a queue still open"
    if not r.queued:
        print(f"nothing to queue: no scored incoming image of {r.version} waits ({left_out})")
        return 0
    reasons = ", ".join(f"{n} {reason}" for reason, n in r.by_reason.items())
    print(f"queued {r.queued} of {r.candidates} scored images of {r.version}: {reasons}")
    print(f"  left out: {left_out}")
    if not r.diversity:
        print(
            "  diversity off: the predictions hold no embeddings (scored before darkroom kept them)"
        )
    if r.links == "presigned":
        print(
            f"  image links expire at {r.expires_at} (sooner if they were signed with temporary "
            "credentials: a link dies with the credentials that signed it)"
        )
    else:
        print("  image links are storage URIs: Label Studio needs access to that storage")
    print(f"Label Studio import file: {storage.url(r.files['json'])}")
    print(f"labeling config:          {storage.url(r.files['xml'])}")
    print(f"table:                    {storage.url(r.files['csv'])}")
    return 0


@command(
    "import-labels",
    "append people's labels from a Label Studio export (JSON, JSON_MIN, CSV) or a key,label "
    "CSV to the labels file; exits 1 when any answer was refused",
    (StorageConfig,),
    args=[
        arg("file", help="the export file"),
        arg(
            "--allow-new-classes",
            action="store_true",
            help="accept labels the champion does not know as new classes",
        ),
        arg("--dry-run", action="store_true", help="report what would be added; write nothing"),
    ],
)
def cmd_import_labels(a) -> int:
    from darkroom.monitoring.answers import import_labels

    storage = open_storage(config_from_args(StorageConfig, a).storage)
    path = Path(a.file)
    if not path.is_file():
        return fail(f"no such file: {a.file}")
    r = import_labels(
        storage,
        path.read_bytes(),
        path.name,
        allow_new_classes=a.allow_new_classes,
        dry_run=a.dry_run,
    )
    verb = "would add" if a.dry_run else "added"
    print(
        f"{verb} {len(r.added)} labels to {r.labels_file}; {len(r.unchanged)} already there, "
        f"{len(r.skipped)} skipped (no answer), {r.refused} refused"
    )
    _refusals("unknown image", {k: why for k, why in r.unknown.items()})
    _refusals(
        "new class (--allow-new-classes accepts it)",
        {k: repr(v) for k, v in r.new_classes.items()},
    )
    _refusals("people disagree", {k: " vs ".join(map(repr, v)) for k, v in r.disagreements.items()})
    _refusals(
        "conflicts with its label (kept)",
        {k: f"has {old!r}, answer {new!r}" for k, (old, new) in r.conflicts.items()},
    )
    return 1 if r.refused else 0


def _refusals(kind: str, rows: dict[str, str]) -> None:
    for key, detail in list(rows.items())[:SHOWN]:
        print(f"  {kind}: {key}: {detail}")
    if len(rows) > SHOWN:
        print(f"  {kind}: {len(rows) - SHOWN} more")
