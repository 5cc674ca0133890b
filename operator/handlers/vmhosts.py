"""VMHost objects: kept in memory as typed inventories; a change wakes the rollouts."""

from __future__ import annotations

from typing import Any

import kopf

from vmupdate_api.crd.constants import GROUP, PLURAL_VMHOSTS, VERSION
from vmupdate_operator.context import OperatorContext
from vmupdate_operator.inventory import HostInventory


@kopf.index(GROUP, VERSION, PLURAL_VMHOSTS)
def vmhost_inventories(*, name: str, body: kopf.Body, **_: Any) -> dict[str, HostInventory]:
    """kopf keeps this index current from its watch; the rollouts read it, never the API."""
    return {name: HostInventory.from_body(body)}


@kopf.on.event(GROUP, VERSION, PLURAL_VMHOSTS)
def vmhost_changed(*, memo: Any, **_: Any) -> None:
    """A heartbeat, a new VM, a finished update: let every rollout look again now."""
    ctx: OperatorContext | None = memo.get("ctx")
    if ctx is not None:
        ctx.wake_all()
