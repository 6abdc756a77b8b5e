"""The ``darkroom`` command line.

``retrain`` and ``score`` run the Prefect flows (so runs show in the Prefect UI when
PREFECT_API_URL points at a server, else on Prefect's temporary local server). Their flags are
made from the flows' pydantic configs (``darkroom.config``), so the CLI, the UI form and the
deployment parameters share one set of fields and defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys

import darkroom
import darkroom.cli.cleanup  # noqa: F401  (registers darkroom cleanup)
import darkroom.cli.labeling  # noqa: F401  (registers label-queue, import-labels)
from darkroom.cli import models, run, tempserver  # noqa: F401  (run and models register their commands)
from darkroom.cli.commands import COMMANDS, fail
from darkroom.cli.flags import add_config_flags, explain
from darkroom.ops import stopping
from darkroom.registry import pointer


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
        return fail(explain(e))
    # ValueError covers bad config values, weights that fail their sha256 check and
    # darkroom.index.DatasetError (not imported here: it would load pandas and torch).
    except (StorageError, FileNotFoundError, pointer.RegistryError, ValueError) as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
