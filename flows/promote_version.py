"""Promote a named version by hand, from the Prefect UI's form (deployment promote-version):
through the same promotion gate as the nightly run, on the current holdout, unless ``force``;
the reason goes into the promotion record. `darkroom promote` does the same from a shell."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from darkroom.config import PromoteVersionConfig
from darkroom.config.decisions import DECISION_TIMEOUT_SECONDS
from tasks.decisions import promote_named
from tasks.naming import flow_options


@flow(**flow_options("promote-version", "promote", DECISION_TIMEOUT_SECONDS))
def promote_version(config: PromoteVersionConfig) -> dict:
    """Makes ``config.version`` the champion; fails, changing nothing, when the gate rejects
    it and ``config.force`` is off."""
    return asdict(promote_named(config))


if __name__ == "__main__":
    import sys

    print(promote_version(PromoteVersionConfig(version=sys.argv[1])))
