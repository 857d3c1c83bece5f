"""Nightshift's Automations (deployments/automations.yaml) on the Prefect server: a
notification when a run's canaries fail or a run fails, and Prefect's zombie-run automation for
Nightshift's flow runs. The file holds Prefect's own Automation schema; two placeholders are
filled in here — the notification block's id and the silence after which a run is a zombie."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nightshift.errors import ConfigurationError

REPO_DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
SHIPPED = REPO_DEPLOYMENTS / "automations.yaml"
DEFAULT_ZOMBIE_AFTER_S = 600  # ten of the 60-s heartbeats deployments/prefect.yaml asks for


class AutomationsError(ConfigurationError):
    """The automations cannot be made: an unknown notification block, a malformed file."""


def shipped_automations(
    notify_block_id: str | None, zombie_after_s: int = DEFAULT_ZOMBIE_AFTER_S, path: Path = SHIPPED
) -> list:
    """The file's automations as Prefect `Automation` objects, placeholders filled in; those that
    need a notification block are left out without one."""
    from prefect.automations import Automation

    if zombie_after_s < 30:
        raise AutomationsError("zombie_after_s must be at least 30: Prefect's heartbeats come every 30 s at the most")
    values = {"notify_block_id": notify_block_id, "zombie_after_s": zombie_after_s}
    automations = []
    for entry in yaml.safe_load(path.read_text()) or []:
        needs = entry.pop("needs", None)
        if needs and values.get(needs) is None:
            continue
        try:
            automations.append(Automation.model_validate(_filled(entry, values)))
        except ValueError as exc:
            raise AutomationsError(f"{path}: automation {entry.get('name')!r}: {exc}") from exc
    return automations


def notification_block_id(block: str) -> str:
    """The id of the notification block `block` ("block-type-slug/name", as `prefect block ls` lists it)."""
    from prefect.blocks.core import Block

    if "/" not in block:
        raise AutomationsError(f"--notify {block!r}: give the block as TYPE/NAME, e.g. slack-webhook/oncall")
    try:
        return str(Block.load(block)._block_document_id)
    except (ValueError, KeyError) as exc:
        raise AutomationsError(f"--notify {block!r}: no such block on the Prefect server ({exc})") from exc


def apply(automations: list) -> list[str]:
    """Create each automation, replacing one of the same name (so `make deploy` can run again)."""
    from prefect.automations import Automation

    applied = []
    for automation in automations:
        while True:  # every automation of that name, one at a time (read gives the first)
            try:
                Automation.read(name=automation.name).delete()
            except ValueError:  # none left
                break
        automation.create()
        applied.append(automation.name)
    return applied


def _filled(value: Any, values: dict[str, Any]) -> Any:
    """`value` with "{{ name }}" placeholders of `values` replaced: a whole-string placeholder by
    the value itself (a number stays a number), one inside a string by its text. Prefect's own
    templates ({{ event.… }}) are left for the server to fill in when the automation fires."""
    if isinstance(value, dict):
        return {key: _filled(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, values) for item in value]
    if isinstance(value, str):
        for name, filling in values.items():
            placeholder = "{{ " + name + " }}"
            if value == placeholder:
                return filling
            value = value.replace(placeholder, str(filling))
    return value
