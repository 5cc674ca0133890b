"""VMUpdate objects: a daemon per object runs its rollout; deletion waits for agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import kopf

from vmupdate_api.crd.constants import GROUP, PLURAL_VMUPDATEHOSTS, PLURAL_VMUPDATES, VERSION
from vmupdate_api.crd.vmupdate import VMRolloutStatus
from vmupdate_operator.context import OperatorContext
from vmupdate_operator.finalizer import still_running
from vmupdate_operator.inventory import HostInventory
from vmupdate_operator.kube import StatusWriteError
from vmupdate_operator.ownership import Claim, Key, claim_from_body
from vmupdate_operator.records import HostRecord, record_from_body

DELETE_RECHECK_S = 5.0


def _hosts(index: kopf.Index[str, HostInventory]) -> Callable[[], Sequence[HostInventory]]:
    """A live view of the VMHost index (kopf updates it in place)."""
    return lambda: [inventory for store in index.values() for inventory in store]


@kopf.index(GROUP, VERSION, PLURAL_VMUPDATES)
def vmupdate_claims(*, uid: str, body: kopf.Body, **_: Any) -> dict[str, Claim]:
    """Every VMUpdate as the one-owner rule sees it (selector, target, rows it acted on)."""
    claim = claim_from_body(body)
    return {uid: claim} if claim is not None else {}


@kopf.index(GROUP, VERSION, PLURAL_VMUPDATEHOSTS)
def vmupdate_records(*, body: kopf.Body, **_: Any) -> dict[str, HostRecord]:
    """Every VMUpdateHost by its VMUpdate's uid: the records a (re)started rollout reads
    back, and the VMs each VMUpdate runs or acted on, for the one-owner rule."""
    record = record_from_body(body)
    return {record.uid: record} if record is not None else {}


def _stored(index: kopf.Index[str, HostRecord]) -> Callable[[str], list[VMRolloutStatus]]:
    def stored(uid: str) -> list[VMRolloutStatus]:
        return [row for record in index.get(uid, ()) for row in record.rows()]
    return stored


def _claims(index: kopf.Index[str, Claim], records: kopf.Index[str, HostRecord]
            ) -> Callable[[], Sequence[Claim]]:
    def claims() -> list[Claim]:
        out: list[Claim] = []
        for uid, store in index.items():
            in_flight: set[Key] = set()
            acted: set[Key] = set()
            for record in records.get(uid, ()):
                in_flight |= record.in_flight
                acted |= record.acted
            out.extend(claim.with_keys(in_flight, acted) for claim in store)
        return out
    return claims


# cancellation_timeout=None: a deleted VMUpdate's daemon is never cancelled, it finishes recording
# its running VM operations; kopf polls it every second to release the finalizer.
@kopf.daemon(GROUP, VERSION, PLURAL_VMUPDATES, cancellation_timeout=None,
             cancellation_polling=1.0)
async def converge(*, body: kopf.Body, memo: Any, stopped: kopf.DaemonStopped,
                   **kwargs: Any) -> None:
    """Runs while the VMUpdate exists and this replica is the active one."""
    ctx: OperatorContext = memo["ctx"]
    vmhost_inventories: kopf.Index[str, HostInventory] = kwargs["vmhost_inventories"]
    claims: kopf.Index[str, Claim] = kwargs["vmupdate_claims"]
    stored: kopf.Index[str, HostRecord] = kwargs["vmupdate_records"]

    logger = kwargs["logger"]

    def event(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)
        logger.info("%s: %s", reason, message)  # below kopf's posting level: not posted twice

    rollout = ctx.new_rollout(body, _hosts(vmhost_inventories), event,
                              _claims(claims, stored), _stored(stored))
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
def vmupdate_changed(*, memo: Any, **_: Any) -> None:
    """A spec change is planned now rather than at the next resync; and since one VMUpdate's
    selector, rows or deletion can change who owns a VM, every rollout looks again."""
    ctx: OperatorContext | None = memo.get("ctx")
    if ctx is not None:
        ctx.wake_all()


@kopf.on.delete(GROUP, VERSION, PLURAL_VMUPDATES, timeout=3600)
async def wait_for_operations(*, uid: str, memo: Any, **kwargs: Any) -> None:
    """Keep the finalizer while an agent still runs an update this VMUpdate started (or
    its rollout still records); then delete its records (a cluster's garbage collector
    would too, through their owner reference; not every cluster runs one)."""
    ctx: OperatorContext = memo["ctx"]
    vmhost_inventories: kopf.Index[str, HostInventory] = kwargs["vmhost_inventories"]
    rows = _stored(kwargs["vmupdate_records"])(uid)
    running = await still_running(rows, _hosts(vmhost_inventories)(), ctx.agents)
    if uid in ctx.rollouts:
        running.append("its rollout still records the last results")
    if running:
        raise kopf.TemporaryError("waiting for VM operations: " + "; ".join(running),
                                  delay=DELETE_RECHECK_S)
    try:
        await ctx.records.delete_all(uid)
    except StatusWriteError as exc:
        raise kopf.TemporaryError(f"deleting the VMUpdateHost records: {exc}",
                                  delay=DELETE_RECHECK_S) from exc
