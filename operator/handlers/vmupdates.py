"""VMUpdate objects: a daemon per object runs its rollout; deletion waits for agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import kopf

from vmupdate_api.crd_models import GROUP, PLURAL_VMUPDATES, VERSION, VMUpdateStatus
from vmupdate_operator.context import OperatorContext
from vmupdate_operator.finalizer import still_running
from vmupdate_operator.inventory import HostInventory

DELETE_RECHECK_S = 5.0


def _hosts(index: kopf.Index[str, HostInventory]) -> Callable[[], Sequence[HostInventory]]:
    """A live view of the VMHost index (kopf updates it in place)."""
    return lambda: [inventory for store in index.values() for inventory in store]


# cancellation_timeout=None: a deleted VMUpdate's daemon is never cancelled, it finishes recording
# its running VM operations; kopf polls it every second to release the finalizer.
@kopf.daemon(GROUP, VERSION, PLURAL_VMUPDATES, cancellation_timeout=None,
             cancellation_polling=1.0)
async def converge(*, body: kopf.Body, memo: Any, stopped: kopf.DaemonStopped,
                   **kwargs: Any) -> None:
    """Runs while the VMUpdate exists and this replica is the active one."""
    ctx: OperatorContext = memo["ctx"]
    vmhost_inventories: kopf.Index[str, HostInventory] = kwargs["vmhost_inventories"]

    logger = kwargs["logger"]

    def event(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)
        logger.info("%s: %s", reason, message)  # below kopf's posting level: not posted twice

    rollout = ctx.new_rollout(body, _hosts(vmhost_inventories), event)
    ctx.rollouts[rollout.uid] = rollout

    async def relay_stop() -> None:
        await stopped.wait()
        reason = stopped.reason
        deleting = reason is not None and bool(reason & kopf.DaemonStoppingReason.RESOURCE_DELETED)
        rollout.stop(deleting=deleting)

    relay = asyncio.create_task(relay_stop())
    try:
        await rollout.run()
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        ctx.rollouts.pop(rollout.uid, None)


@kopf.on.event(GROUP, VERSION, PLURAL_VMUPDATES)
def vmupdate_changed(*, uid: str, memo: Any, **_: Any) -> None:
    """A spec change is planned now rather than at the next resync."""
    ctx: OperatorContext | None = memo.get("ctx")
    rollout = ctx.rollouts.get(uid) if ctx is not None else None
    if rollout is not None:
        rollout.wake()


@kopf.on.delete(GROUP, VERSION, PLURAL_VMUPDATES, timeout=3600)
async def wait_for_operations(*, status: kopf.Status, memo: Any, **kwargs: Any) -> None:
    """Keep the finalizer while an agent still runs an update this VMUpdate started."""
    ctx: OperatorContext = memo["ctx"]
    vmhost_inventories: kopf.Index[str, HostInventory] = kwargs["vmhost_inventories"]
    rows = VMUpdateStatus.model_validate(dict(status)).vms if status else []
    running = await still_running(rows, _hosts(vmhost_inventories)(), ctx.agents)
    if running:
        raise kopf.TemporaryError("waiting for VM operations: " + "; ".join(running),
                                  delay=DELETE_RECHECK_S)
