"""The registry of ``darkroom`` subcommands: each registers its flags (made from the flows'
pydantic configs, so the CLI, the UI form and the deployment parameters share one set of fields
and defaults) and its function; ``main`` builds the parser from it."""

from __future__ import annotations

import sys

from darkroom.config import RuntimeConfig

COMMANDS: dict[str, dict] = {}


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


def arg(*flags, **kw) -> tuple:
    return flags, kw


def fail(message: str) -> int:
    """One line on stderr that says what to fix, and exit status 1 (2 is argparse's)."""
    print(f"darkroom: error: {' '.join(message.split())}", file=sys.stderr)
    return 1
