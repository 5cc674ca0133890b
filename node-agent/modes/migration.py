"""QEMU's side of an update over QMP: waits on its migration (by MIGRATION events where the
QEMU reports them, else by polling), the `cont` that ends the pause, its version, and the
capabilities a failed update leaves as it found them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

from vmupdate_agent.models import MIGRATION_ENDED, Target
from vmupdate_agent.modes.common import poll_until
from vmupdate_agent.qmp import Event, QmpError, QmpSession, QmpTimeout


async def wait_incoming_loaded(session: QmpSession, timeout: float, *,
                               events: bool = False) -> None:
    """Until the new QEMU has loaded the state and sits paused (it was started with -S).

    `events`: it reports its incoming migration as MIGRATION events (started with
    `argv.INCOMING_EVENTS`, or its capability set before `migrate-incoming`), and is woken
    on the one that ends it rather than polled; QEMU sets the runstate before it reports
    "completed". One query first covers a load that ended before this session connected.
    Without: a poll, for a QEMU that does not (the hand-made sequences, a rolled-back one)."""
    if events:
        mark = session.mark()
        mig = await session.cmd("query-migrate")
        if mig.get("status") not in MIGRATION_ENDED:
            mig = await _migration_ended(session, since=mark, timeout=timeout,
                                         what="loading the state into the new QEMU")
        if mig.get("status") != "completed":
            raise QmpError(f"the new QEMU failed to load the state: "
                           f"{mig.get('error-desc', mig.get('status'))}")
        return

    async def loaded() -> bool:
        mig = await session.cmd("query-migrate")
        status = mig.get("status")
        if status in ("failed", "cancelled"):
            raise QmpError(f"the new QEMU failed to load the state: "
                           f"{mig.get('error-desc', status)}")
        if status != "completed":
            return False
        st = await session.cmd("query-status")
        return bool(st.get("status") in ("paused", "running"))

    await poll_until(loaded, timeout=timeout, what="loading the state into the new QEMU")


async def wait_outgoing_done(session: QmpSession, timeout: float) -> dict[str, Any]:
    """`wait_outgoing_ended` for a QEMU without MIGRATION events: a poll (the hand-made
    sequences and the plain migration of the benchmarks)."""

    async def done() -> dict[str, Any] | None:
        mig: dict[str, Any] = await session.cmd("query-migrate")
        if mig.get("status") in MIGRATION_ENDED:
            return mig
        return None

    result: dict[str, Any] = await poll_until(done, timeout=timeout,
                                              what="saving the VM state")
    return result


async def set_migration_events(session: QmpSession, on: bool) -> None:
    """Whether this QEMU reports its outgoing migration as MIGRATION events. On for an update,
    so that the agent waits on them (`wait_outgoing_ended`) rather than polling the QEMU while
    the guest is stopped (a poll competes for the CPU with the very hand-over it waits for);
    off again when the update fails and the VM stays in this QEMU, as it was found."""
    await session.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": on}]})


async def wait_outgoing_ended(session: QmpSession, *, since: int, timeout: float
                              ) -> dict[str, Any]:
    """How the migration this QEMU sends ended, from its MIGRATION events (see
    `set_migration_events`; `since`: a mark taken before `migrate`): `{"status": ...}`, with
    QEMU's `error-desc` when it failed. Its monitor closing first is an error."""
    return await _migration_ended(session, since=since, timeout=timeout,
                                  what="sending the state")


async def _migration_ended(session: QmpSession, *, since: int, timeout: float, what: str
                           ) -> dict[str, Any]:
    """The MIGRATION event (after `since`) that ends this QEMU's migration, either way; the
    QEMU's monitor closing before it is an error, not a wait until the timeout."""
    ended = asyncio.create_task(session.wait_event(
        "MIGRATION", since=since, timeout=timeout,
        predicate=lambda e: e.data.get("status") in MIGRATION_ENDED))
    gone = asyncio.create_task(session.wait_disconnected(timeout))
    try:
        done, _ = await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ended, gone):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    if ended in done:
        status = ended.result().data["status"]  # or its QmpTimeout
        if status == "completed":
            return {"status": status}
        with contextlib.suppress(QmpError):
            return cast(dict[str, Any], await session.cmd("query-migrate"))
        return {"status": status}
    gone.result()  # its QmpTimeout, if that is how it ended
    raise QmpError(f"the monitor of QEMU pid {session.peer_pid} closed while {what}")


class NotResumed(QmpError):
    """`cont` failed (the QEMU died or hung) and no RESUME came: the guest has not run in
    that QEMU, so the state it was given is still the guest's and a rollback is safe."""


async def resume(session: QmpSession, timeout: float) -> Event:
    mark = session.mark()
    try:
        await session.cmd("cont", timeout=timeout)
    except QmpError as exc:
        if any(e.name == "RESUME" for e in session.events[mark:]):
            raise
        raise NotResumed(str(exc)) from exc
    return await session.wait_event("RESUME", since=mark, timeout=timeout)


async def ensure_running(session: QmpSession, was_running: bool) -> str:
    """The safety net on every path that did not reach the point of no return."""
    try:
        st = await session.cmd("query-status")
    except QmpError as exc:
        return f"could not check the VM's state: {exc}"
    if st.get("status") in ("paused", "postmigrate") and was_running:
        mark = session.mark()
        await session.cmd("cont")
        # Its RESUME ends the pause the failed attempt caused (see failed_pause_ms).
        with contextlib.suppress(QmpTimeout):
            await session.wait_event("RESUME", since=mark,
                                     timeout=min(session.command_timeout, 2.0))
        return "the VM was paused by the failed attempt and has been resumed"
    return f"the VM is {st.get('status')}"


async def verify_version(session: QmpSession, target: Target) -> str:
    ver = await session.cmd("query-version")
    q = ver["qemu"]
    got = f"{q['major']}.{q['minor']}.{q['micro']}"
    expected = target.expected_version
    pkg = str(ver.get("package", "")).strip()
    if expected and expected not in (got, pkg, f"{got} ({pkg})"):
        raise QmpError(f"the new QEMU reports version {got} ({pkg}), expected {expected}")
    return got


@contextlib.asynccontextmanager
async def version_asked(session: QmpSession, target: Target
                        ) -> AsyncIterator[asyncio.Task[str]]:
    """`async with version_asked(s, t) as version: <wait for the load>` then `await version`:
    the new QEMU's version is asked while it loads the state (QMP answers both in turn), as
    every round trip between the load and the resume is inside the guest's pause. A failed
    load cancels the question; the version's own error comes from the `await`."""
    version = asyncio.create_task(verify_version(session, target))
    try:
        yield version
    except BaseException:
        version.cancel()
        with contextlib.suppress(BaseException):
            await version
        raise


async def reset_capabilities(session: QmpSession) -> None:
    """x-ignore-shared belongs to cpr-reboot: the receiving QEMU of the other modes starts
    without it and refuses a stream that has it (a VM once moved by cpr-reboot may still)."""
    caps = await session.cmd("query-migrate-capabilities")
    if any(c.get("capability") == "x-ignore-shared" and c.get("state") for c in caps):
        await session.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False}]})
