"""Rig smoke test: a raw cpr-exec of the chrooted sid QEMU works with the rig's paths.

Not the product's engine: just proof that paths seen inside the sid root (the share, the
wrappers, the alternative binary) are right for a QEMU that execs itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from e2e.rig import TestVM, connect_qmp
from e2e.rig.fixtures import VMFactory

pytestmark = pytest.mark.qemu


async def cpr_exec(vm: TestVM, new_binary: str, state_name: str) -> float:
    """cpr-exec ``vm`` into ``new_binary`` (a path as seen inside the root); return ms from
    ``migrate`` until QMP answered ``running`` again."""
    state = vm.workdir / state_name
    q = await connect_qmp(vm.qmp_path, timeout=10)
    try:
        params = await q.execute("query-migrate-parameters")
        assert isinstance(params, dict) and "cpr-exec-command" in params, params
        await q.execute(
            "migrate-set-parameters",
            {"mode": "cpr-exec",
             "cpr-exec-command": [new_binary, *vm.args, "-incoming", f"file:{state}"]},
        )
        t0 = time.monotonic()
        await asyncio.wait_for(q.execute("migrate", {"uri": f"file:{state}"}), 10)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(q.disconnect(), 5)
    # The old monitor goes away with the exec; the new QEMU listens at the same path.
    deadline = time.monotonic() + 30
    while True:
        q = await connect_qmp(vm.qmp_path, timeout=30)
        try:
            status = await asyncio.wait_for(q.execute("query-status"), 10)
        except Exception:
            status = None  # connected to the old monitor just before it went away
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(q.disconnect(), 5)
        assert isinstance(status, dict | None)
        if status is not None and status["status"] == "running":
            return (time.monotonic() - t0) * 1000
        assert time.monotonic() < deadline, f"VM not running after cpr-exec: {status}"
        await asyncio.sleep(0.01)


async def test_cpr_exec_through_alt_binary_keeps_pid_and_guest(vm_factory: VMFactory) -> None:
    vm = await vm_factory("sid", name="rig-cpr")
    rig = vm.rig
    assert rig.sid.alt_wrapper is not None and rig.sid.alt_binary is not None
    assert rig.sid.root is not None
    pid = vm.pid
    token = await vm.wait_ticking(timeout=90)
    await vm.serial.wait_ticks(20, timeout=10)

    # 1: through the alt wrapper, a path in the share that is the same inside the root
    mark = time.monotonic_ns()
    ms1 = await cpr_exec(vm, str(rig.sid.alt_wrapper), "cpr1.state")
    await vm.serial.wait_ticks(50, after=time.monotonic_ns(), timeout=30)
    assert await vm.refresh_pid() == pid, "cpr-exec must keep the pid"
    assert os.readlink(f"/proc/{pid}/exe") == str(rig.sid.root) + rig.sid.alt_binary
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv0 = f.read().split(b"\0")[0].decode()
    assert argv0 == rig.sid.alt_binary
    gap1 = vm.serial.max_gap_ms(since=mark)

    # 2: back to the main binary, by its path inside the root (parameters reset on exec)
    mark = time.monotonic_ns()
    ms2 = await cpr_exec(vm, rig.sid.binary, "cpr2.state")
    await vm.serial.wait_ticks(50, after=time.monotonic_ns(), timeout=30)
    assert await vm.refresh_pid() == pid
    assert os.readlink(f"/proc/{pid}/exe") == str(rig.sid.root) + rig.sid.binary
    gap2 = vm.serial.max_gap_ms(since=mark)

    vm.serial.assert_continuous()
    assert vm.token == token
    print(f"cpr-exec: migrate->running {ms1:.0f} / {ms2:.0f} ms, "
          f"host-side serial gap {gap1:.0f} / {gap2:.0f} ms")
    assert gap1 < 5000 and gap2 < 5000
    await vm.stop()
