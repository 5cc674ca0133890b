"""vhost-user-blk and CPR on real QEMU 11.1.3, with a real back end (qemu-storage-daemon) and
the guest writing and reading its disk the whole time (the rig's disk guest, guest/diskio.c).

Per mode (docs/vhost-user.md): cpr-exec carries the device over (the exec drops the
connection to the back end and the new QEMU makes it again), so it is tested with the
guest's I/O going on: the guest's counter is continuous, its disk load goes on, and every
block written before the update reads back intact after it. cpr-transfer and cpr-reboot are
refused in preflight, before the guest stops; further tests show why, by letting the agent
try them, and that QEMU alone carries the device through a cpr-reboot that quits first.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from e2e.rig import Rig, TestVM
from e2e.rig.fixtures import VMFactory
from e2e.rig.storage import (
    DISK_LAG,
    DiskLine,
    StorageDaemon,
    disk_errors,
    disk_lines,
    start_storage_daemon,
)
from e2e.rig.vm import pid_alive, runs
from tests.agent import raw_cpr
from tests.agent.conftest import make_engine
from tests.agent.test_cpr_qemu import assert_pause_within_blackout, sid, started, update
from vmupdate_agent import engine
from vmupdate_agent.models import CprMode, Outcome, RequestedMode, Target
from vmupdate_agent.modes.common import Timeouts

pytestmark = pytest.mark.qemu

DEVICE = "device vblk0 (vhost-user-blk-pci)"


@pytest_asyncio.fixture
async def backend(rig: Rig) -> AsyncIterator[StorageDaemon]:
    workdir = rig.vms_dir / f"qsd-{secrets.token_hex(4)}"
    daemon = await start_storage_daemon(rig, workdir)
    try:
        yield daemon
    finally:
        await daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def disk_vm(rig: Rig, vm_factory: VMFactory, backend: StorageDaemon,
                  memory: str = "memfd") -> TestVM:
    vm = await started(vm_factory, "sid", backend=memory, initrd=rig.disk_initrd(),
                       extra_args=backend.vm_args())
    await wait_disk(vm, lambda d: d.writes >= 50, "the guest's disk I/O to start")
    return vm


async def wait_disk(vm: TestVM, enough: Callable[[DiskLine], bool], what: str,
                    timeout: float = 180) -> DiskLine:
    await vm.serial.wait_for(lambda: any(enough(d) for d in disk_lines(vm.serial))
                             or bool(disk_errors(vm.serial)), timeout=timeout, what=what)
    assert not disk_errors(vm.serial), disk_errors(vm.serial)
    return next(d for d in disk_lines(vm.serial) if enough(d))


async def assert_disk_kept(vm: TestVM, mark_ns: int) -> None:
    """The guest's disk went on after `mark_ns` (the update's start) and every write made
    before it was read back intact afterwards."""
    before = [d for d in disk_lines(vm.serial) if d.t_ns < mark_ns]
    assert before, "no disk I/O before the update"
    last = before[-1]
    # Reads check the writes in order, DISK_LAG writes behind: once `verified` passes the
    # last write seen before the update, all of them were read back, the latest ones from
    # the new QEMU.
    after = await wait_disk(vm, lambda d: d.verified > last.writes + 1,
                            f"the guest to read back its writes from before the update "
                            f"(writes {last.writes} + {DISK_LAG})")
    lines = disk_lines(vm.serial)
    assert {d.token for d in lines} == {last.token}, "diskio restarted: the guest rebooted?"
    assert all(d.ok for d in lines), [d for d in lines if not d.ok][:3]
    writes = [d.writes for d in lines]
    assert writes == sorted(writes) and after.writes > last.writes + DISK_LAG


async def test_cpr_exec_carries_vhost_user_blk_with_disk_io(
        rig: Rig, vm_factory: VMFactory, backend: StorageDaemon, agent: engine.Engine) -> None:
    vm = await disk_vm(rig, vm_factory, backend)
    pid = vm.pid
    report = await agent.preflight(str(vm.qmp_path), Target(binary=sid(rig)),
                                   RequestedMode.AUTO)
    assert report.passed, [c.message for c in report.failures()]
    assert report.mode == CprMode.CPR_EXEC
    # Two in a row, between two builds (sid's and trixie-backports' 11.1.3): the second one
    # starts from a QEMU that itself connected to the back end after an exec.
    for flavour in ("trixie-backports", "sid"):
        mark = time.monotonic_ns()
        result = await update(agent, vm, str(rig.qemu(flavour).wrapper), "cpr-exec")
        assert result.outcome == Outcome.UPDATED, result.message
        assert result.pid_after == pid == vm.pid
        assert runs(pid, rig.qemu(flavour))
        await assert_disk_kept(vm, mark)
        assert_pause_within_blackout(result, vm)
        print(f"cpr-exec with vhost-user-blk: pause {result.pause_ms:.1f} ms {result.phase_ms}")
    vm.serial.assert_continuous()


REFUSED = {
    CprMode.CPR_TRANSFER: "cpr-transfer starts the new QEMU while the old one still holds",
    CprMode.CPR_REBOOT: "cpr-reboot starts the new QEMU beside the stopped old one",
}


def memory_for(mode: CprMode) -> str:
    return "file" if mode == CprMode.CPR_REBOOT else "memfd"  # cpr-reboot: RAM on /dev/shm


@pytest.mark.parametrize("mode", list(REFUSED))
async def test_refused_in_preflight_before_the_guest_stops(
        rig: Rig, vm_factory: VMFactory, backend: StorageDaemon, agent: engine.Engine,
        mode: CprMode) -> None:
    vm = await disk_vm(rig, vm_factory, backend, memory=memory_for(mode))
    pid = vm.pid
    report = await agent.preflight(str(vm.qmp_path), Target(binary=sid(rig)),
                                   RequestedMode(mode.value))
    assert [c.name for c in report.failures()] == ["vhost"]
    [check] = report.failures()
    assert check.message.startswith(f"{DEVICE}: {REFUSED[mode]}"), check.message
    assert "Use cpr-exec" in check.message

    mark = time.monotonic_ns()
    result = await update(agent, vm, sid(rig), mode.value)
    assert result.outcome == Outcome.FAILED
    assert "preflight failed" in result.message and DEVICE in result.message
    assert result.paused_at_ns is None  # the guest was never stopped
    assert vm.pid == pid and await vm.query_status() == "running"
    await assert_disk_kept(vm, mark)
    vm.serial.assert_continuous()


@pytest.mark.parametrize("mode", list(REFUSED))
async def test_without_the_refusal_the_new_qemu_waits_on_the_back_end(
        rig: Rig, vm_factory: VMFactory, backend: StorageDaemon, runtime_dir: Path,
        built_guard: Path, mode: CprMode) -> None:
    """Why preflight refuses (what QEMU 11.1.3 does): QEMU raises no blocker; the new QEMU
    connects to the back end while the old one holds it and waits for an answer that never
    comes. cpr-transfer: the handover never starts, the guest is never stopped. cpr-reboot
    as the agent runs it: the guest is stopped and stays paused until the agent gives up
    (its handover timeout, shortened here) and resumes the old QEMU. Either way the agent
    keeps the VM, and its disk."""
    base = make_engine(rig, runtime_dir, built_guard).settings
    eng = engine.Engine(dataclasses.replace(
        base, timeouts=Timeouts(command=10, handover=5, load=10, guard_commit=30)))
    vm = await disk_vm(rig, vm_factory, backend, memory=memory_for(mode))
    pid = vm.pid
    async with vm.qmp() as qmp:
        await qmp.execute("migrate-set-parameters", {"mode": mode.value})
        info = await qmp.execute("query-migrate")
        assert isinstance(info, dict)
        blocked = info.get("blocked-reasons")
        await qmp.execute("migrate-set-parameters", {"mode": "normal"})
    assert not blocked, f"QEMU now blocks {mode} itself: {blocked}"

    mark = time.monotonic_ns()
    result = await eng.update(str(vm.qmp_path), Target(binary=sid(rig)),
                              RequestedMode(mode.value), skip_preflight=True)
    assert result.outcome == Outcome.FAILED, result.message
    assert vm.pid == pid and pid_alive(pid)
    assert await vm.query_status() == "running"
    if mode == CprMode.CPR_TRANSFER:
        assert result.paused_at_ns is None, "the guest was stopped"
    else:
        assert "did not answer on QMP" in result.message, result.message
    await assert_disk_kept(vm, mark)
    vm.serial.assert_continuous()
    print(f"{mode} without the refusal: {result.message}; longest serial gap "
          f"{vm.serial.max_gap_ms(since=mark):.0f} ms")


async def test_qemu_alone_carries_it_through_a_cpr_reboot_that_quits_first(
        rig: Rig, vm_factory: VMFactory, backend: StorageDaemon, runtime_dir: Path) -> None:
    """QEMU's own part of cpr-reboot works with vhost-user-blk when the old QEMU quits before
    the new one starts (by hand, as QEMU documents it): the refusal is about the agent
    keeping the old QEMU as its way back, not about QEMU."""
    vm = await disk_vm(rig, vm_factory, backend, memory="file")
    mark = time.monotonic_ns()
    stop_ns, resume_ns = await raw_cpr.cpr_reboot(vm, sid(rig), runtime_dir)
    await assert_disk_kept(vm, mark)
    vm.serial.assert_continuous()
    print(f"hand-made cpr-reboot with vhost-user-blk: STOP->RESUME "
          f"{(resume_ns - stop_ns) / 1e6:.0f} ms")


async def test_cpr_exec_rollback_reconnects_the_old_qemu(
        rig: Rig, vm_factory: VMFactory, backend: StorageDaemon, runtime_dir: Path,
        built_guard: Path) -> None:
    """A new QEMU that builds the machine (connecting to the back end) and then fails to load
    (another machine type, preflight skipped): the guard's rollback execs the old binary,
    which connects to the back end again; the disk goes on, nothing written is lost, and the
    VM updates cleanly afterwards."""
    agent = make_engine(rig, runtime_dir, built_guard)
    vm = await disk_vm(rig, vm_factory, backend)
    old_pid = vm.pid
    mark = time.monotonic_ns()
    result = await agent.update(str(vm.qmp_path),
                                Target(binary=sid(rig), extra_args=("-machine", "pc-q35-9.2")),
                                RequestedMode.CPR_EXEC, skip_preflight=True)
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert result.pid_after is not None and result.pid_after != old_pid
    # It failed in the load, after building the device (and connecting to the back end).
    assert "Machine type received is" in vm.qemu_log(), vm.qemu_log()[-1000:]
    await assert_disk_kept(vm, mark)
    assert vm.pid == result.pid_after
    vm.serial.assert_continuous()

    mark = time.monotonic_ns()
    again = await update(agent, vm, sid(rig), "cpr-exec")
    assert again.outcome == Outcome.UPDATED, again.message
    await assert_disk_kept(vm, mark)
    vm.serial.assert_continuous()


async def test_a_vhost_user_device_in_readconfig_is_refused_with_the_reason(
        rig: Rig, vm_factory: VMFactory, backend: StorageDaemon, agent: engine.Engine,
        runtime_dir: Path) -> None:
    """Declared in a -readconfig file, the device is seen by discovery (the file's sections
    read as command-line words) and refused by name: the dry run would read the same file
    and wait on the back end the VM holds."""
    cfg = runtime_dir / "vm-devices.cfg"  # in the share: the chrooted QEMU sees this path
    cfg.write_text(f'[chardev "vhu0"]\n  backend = "socket"\n  path = "{backend.socket}"\n'
                   '[device "vblk0"]\n  driver = "vhost-user-blk-pci"\n  chardev = "vhu0"\n')
    vm = await started(vm_factory, "sid", initrd=rig.disk_initrd(),
                       extra_args=["-readconfig", str(cfg)])
    await wait_disk(vm, lambda d: d.writes >= 50, "the guest's disk I/O to start")
    report = await agent.preflight(str(vm.qmp_path), Target(binary=sid(rig)),
                                   RequestedMode.CPR_EXEC, dry_run=False)
    [check] = [c for c in report.checks if c.name == "vhost"]
    assert not check.passed
    assert check.message.startswith(f"{DEVICE} is declared in a -readconfig file"), \
        check.message
    vm.serial.assert_continuous()
