"""Roll the champion back, from the Prefect UI's form (deployment rollback): to the champion
before the current one, or to a version the promotion history names, with a reason kept in the
record. `darkroom rollback` does the same from a shell."""

from __future__ import annotations

from prefect import flow

from darkroom.config import RollbackConfig
from darkroom.config.decisions import DECISION_TIMEOUT_SECONDS
from tasks.decisions import roll_back
from tasks.naming import flow_options


@flow(**flow_options("rollback", "rollback", DECISION_TIMEOUT_SECONDS))
def rollback(config: RollbackConfig = RollbackConfig()) -> dict:
    """Points the champion back; the record says from which version, to which and why."""
    return roll_back(config).as_dict()


if __name__ == "__main__":
    print(rollback())
