"""deployments/automations.yaml as the tests read it: its automations, and the notification
action its header tells an operator to swap in once a notification block exists."""

from __future__ import annotations

from uuid import UUID

import yaml

from tasks.deployments import ROOT

AUTOMATIONS_YAML = ROOT / "deployments" / "automations.yaml"
SWAP_FROM = {"type": "do-nothing"}


def automations() -> list[dict]:
    """The automations, as `prefect automation create --from-file` reads them."""
    return yaml.safe_load(AUTOMATIONS_YAML.read_text())["automations"]


def documented_notification(block_document_id: UUID | str) -> dict:
    """The header's `send-notification` action (a YAML snippet in comments), for a block."""
    lines = AUTOMATIONS_YAML.read_text().splitlines()
    start = lines.index("#   - type: send-notification")
    snippet = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("#     "):
            break
        snippet.append(line)
    (action,) = yaml.safe_load("\n".join(line.removeprefix("#   ") for line in snippet))
    return {**action, "block_document_id": str(block_document_id)}


def with_notifications(block_document_id: UUID | str, suffix: str = "") -> list[dict]:
    """The automations with every do-nothing action replaced as the header says."""
    action = documented_notification(block_document_id)
    return [
        {
            **a,
            "name": a["name"] + suffix,
            "actions": [action if act == SWAP_FROM else act for act in a["actions"]],
        }
        for a in automations()
    ]
