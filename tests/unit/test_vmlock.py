"""The per-VM lock shared by the service and the CLI (vmlock.py), across real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmupdate_agent import vmlock

SOCK = "/run/vms/vm1/qmp.sock"


def holder(kind: str = "update", op_id: str = "op-1", **kw: object) -> vmlock.Holder:
    return vmlock.Holder.model_validate({
        "operation_id": op_id, "kind": kind, "program": "vmupdate-agent update",
        "pid": os.getpid(), "since_ns": 1_700_000_000 * 10**9, "vm_name": "vm1",
        "vm_uuid": "u-1", "qmp_path": SOCK, **kw})


def hold_in_child(state_dir: Path, kind: str = "update") -> subprocess.Popen[bytes]:
    """Another process holding the VM's lock until killed; returns once it holds it."""
    code = ("import os, sys, time\n"
            "from vmupdate_agent import vmlock\n"
            f"h = vmlock.Holder(operation_id='op-child', kind={kind!r}, program='child', "
            "pid=os.getpid(), since_ns=time.time_ns(), vm_name='vm1', vm_uuid='u-1', "
            f"qmp_path={SOCK!r})\n"
            f"lock = vmlock.try_acquire({str(state_dir)!r}, {SOCK!r}, h)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"held\n"
    return child


def test_one_holder_at_a_time_and_release_frees_it(tmp_path: Path) -> None:
    lock = vmlock.try_acquire(tmp_path, SOCK, holder())
    assert vmlock.holder_of(tmp_path, SOCK) == (True, holder())
    with pytest.raises(vmlock.VmBusy) as busy:
        vmlock.try_acquire(tmp_path, SOCK, holder(op_id="op-2"))  # same process, other open
    assert busy.value.holder == holder()
    assert "operation op-1 (update by vmupdate-agent update, pid" in str(busy.value)
    lock.release()
    lock.release()  # idempotent
    assert vmlock.holder_of(tmp_path, SOCK) == (False, None)
    again = vmlock.try_acquire(tmp_path, SOCK, holder(op_id="op-2"))
    assert vmlock.holder_of(tmp_path, SOCK)[1] == holder(op_id="op-2")
    again.release()


def test_other_vms_are_not_held(tmp_path: Path) -> None:
    lock = vmlock.try_acquire(tmp_path, SOCK, holder())
    other = vmlock.try_acquire(tmp_path, "/run/vms/vm2/qmp.sock", holder())
    assert vmlock.held(tmp_path, [SOCK, "/run/vms/vm2/qmp.sock", "/run/vms/vm3/qmp.sock"]
                       ).keys() == {SOCK, "/run/vms/vm2/qmp.sock"}
    lock.release()
    other.release()
    assert vmlock.lock_path(tmp_path, SOCK) == vmlock.lock_path(tmp_path, SOCK + "/")


def test_a_killed_holder_lets_go(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(vmlock.VmBusy) as busy:
            vmlock.try_acquire(tmp_path, SOCK, holder())
        assert busy.value.holder is not None
        assert (busy.value.holder.operation_id, busy.value.holder.pid) == ("op-child", child.pid)
        assert busy.value.holder.matches("vm1") and busy.value.holder.matches("u-1")
        assert busy.value.holder.matches(SOCK) and not busy.value.holder.matches("vm2")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # SIGKILL: no release ran, the kernel dropped the lock; its stale description stays.
    assert vmlock.holder_of(tmp_path, SOCK) == (False, None)
    lock = vmlock.try_acquire(tmp_path, SOCK, holder())
    assert vmlock.holder_of(tmp_path, SOCK) == (True, holder())
    lock.release()


def test_a_holder_that_has_not_said_who_it_is(tmp_path: Path) -> None:
    """Held without a description (a holder between lock and write): busy, holder unknown,
    after a few short looks."""
    path = vmlock.lock_path(tmp_path, SOCK)
    path.parent.mkdir(parents=True)
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"held\n"
        started = time.monotonic()
        with pytest.raises(vmlock.VmBusy) as busy:
            vmlock.try_acquire(tmp_path, SOCK, holder())
        assert busy.value.holder is None
        assert "another process holds its lock" in str(busy.value)
        assert time.monotonic() - started < 5
        assert vmlock.holder_of(tmp_path, SOCK) == (True, None)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_descriptions_name_the_operation_or_the_kind() -> None:
    assert holder().describe().startswith(
        "operation op-1 (update by vmupdate-agent update, pid ")
    assert holder(kind="preflight", op_id="").describe().startswith("a preflight (preflight")
    assert "since 2023-11-14T22:13:20Z" in holder().describe()


def test_the_lock_file_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    path = vmlock.lock_path(tmp_path, SOCK)
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("x")
    path.symlink_to(target)
    with pytest.raises(OSError):
        vmlock.try_acquire(tmp_path, SOCK, holder())
    assert target.read_text() == "x"


async def test_a_caller_cancelled_while_taking_the_lock_does_not_leave_it_held(
        tmp_path: Path) -> None:
    from vmupdate_agent import admission

    for _ in range(20):
        task = asyncio.create_task(admission._acquire(str(tmp_path), SOCK, holder()))
        await asyncio.sleep(0)  # the worker thread is on its way
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while vmlock.holder_of(tmp_path, SOCK)[0]:
            assert time.monotonic() < deadline, "the lock stayed held"
            await asyncio.sleep(0.005)
    # A worker thread of an earlier round may still be on its way to the lock (the look
    # above can come before it): it must let go of it once it returns.
    deadline = time.monotonic() + 5
    while True:
        try:
            lock = await admission._acquire(str(tmp_path), SOCK, holder())
            break
        except vmlock.VmBusy:
            assert time.monotonic() < deadline, "the lock stayed held"
            await asyncio.sleep(0.005)
    assert vmlock.holder_of(tmp_path, SOCK) == (True, holder())
    lock.release()
