"""The CPR engine on real QEMU processes running a real guest (TCG), no QMP mocks.

Over 450 lines on purpose: every mode against the same guest checks and VM fixtures.

Each test checks the guest from outside: its serial counter must go on by exactly one per
line, with the boot-time token unchanged and every RAM checksum good — so the guest neither
rebooted nor lost memory — and the pause the agent reports is checked against the blackout
seen on the serial line.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from e2e.rig import Rig, TestVM
from e2e.rig.config import Flavour
from e2e.rig.fixtures import VMFactory
from e2e.rig.vm import Backend
from tests.agent import raw_cpr
from tests.agent.conftest import make_engine
from vmupdate_agent import engine, pathpolicy, procfs
from vmupdate_agent.argv import INCOMING_EVENTS
from vmupdate_agent.models import CprMode, Outcome, RequestedMode, Target, UpdateResult

pytestmark = pytest.mark.qemu


def sid(rig: Rig, alt: bool = False) -> str:
    q = rig.qemu("sid")
    return str(q.alt_wrapper if alt else q.wrapper)


def backports(rig: Rig) -> str:
    return str(rig.qemu("backports").wrapper)


async def update(agent: engine.Engine, vm: TestVM, binary: str, mode: str = "auto",
                 **kwargs: object) -> UpdateResult:
    result = await agent.update(str(vm.qmp_path), Target(binary=binary, **kwargs),  # type: ignore[arg-type]
                                RequestedMode(mode))
    # Let the guest print a few lines on the other side before judging continuity.
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    return result


async def update_in_agent_process(rig: Rig, vm: TestVM, runtime_dir: Path, binary: str,
                                  mode: str) -> UpdateResult:
    """An update by the agent as its own process (the CLI), as in production: run inside
    the test process, its work right after RESUME would take CPU from the guest's first
    moments in the new QEMU and lengthen the blackout the serial line shows."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmupdate_agent.cli", "--allowed-dir",
        str(Path(rig.share) / "bin"), "--runtime-dir", str(runtime_dir), "--json", "update",
        str(vm.qmp_path), "--binary", binary, "--mode", mode,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert out, err.decode()
    result = UpdateResult.model_validate_json(out)
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    return result


def serial_gap_at_pause(result: UpdateResult, vm: TestVM) -> float:
    """The largest gap between serial lines around the pause the agent reported (from the
    last line before STOP to a second after RESUME): the blackout seen from outside. The
    window matters: preflight's dry run also takes CPU from the guest, earlier."""
    assert result.paused_at_ns is not None and result.resumed_at_ns is not None
    wall_to_mono = time.time_ns() - time.monotonic_ns()
    return vm.serial.max_gap_ms(since=result.paused_at_ns - wall_to_mono,
                                until=result.resumed_at_ns - wall_to_mono + 1_000_000_000)


def assert_pause_within_blackout(result: UpdateResult, vm: TestVM) -> None:
    """The guest cannot have been stopped longer than it was silent."""
    assert result.pause_ms is not None and result.pause_ms > 0
    gap = serial_gap_at_pause(result, vm)
    assert result.pause_ms <= gap + 5.0, (
        f"agent says {result.pause_ms:.1f} ms, but the guest printed within {gap:.1f} ms")


async def started(factory: VMFactory, flavour: str, **kwargs: object) -> TestVM:
    vm = await factory(flavour, **kwargs)  # type: ignore[arg-type]
    await vm.wait_ticking(90)
    return vm


async def test_cpr_exec_keeps_pid_and_guest(rig: Rig, vm_factory: VMFactory,
                                            agent: engine.Engine) -> None:
    vm = await started(vm_factory, "sid")
    pid, token = vm.pid, vm.token
    result = await update(agent, vm, sid(rig), "cpr-exec", expected_version=rig.qemu("sid").version)
    assert result.outcome == Outcome.UPDATED, result.message
    assert result.mode == CprMode.CPR_EXEC
    assert result.pid_before == pid and result.pid_after == pid == vm.pid
    assert result.version_after == rig.qemu("sid").version
    assert vm.token == token
    vm.serial.assert_continuous()
    assert result.pause_ms is not None and result.paused_at_ns is not None
    assert set(result.phase_ms) >= {"stopping", "execed", "total"}
    async with vm.qmp() as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"


async def test_cpr_exec_through_a_different_binary_path(rig: Rig, vm_factory: VMFactory,
                                                        agent: engine.Engine) -> None:
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    result = await update(agent, vm, sid(rig, alt=True), "cpr-exec")
    assert result.outcome == Outcome.UPDATED, result.message
    assert vm.pid == pid
    # The VM now runs the other binary, and a later update sees it as its own.
    exe = procfs.exe(pid)
    assert exe == str(rig.qemu("sid").alt_binary), exe
    vm.serial.assert_continuous()


async def test_five_back_to_back_cpr_exec_updates(rig: Rig, vm_factory: VMFactory,
                                                  runtime_dir: Path) -> None:
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    results = []
    for i in range(5):
        result = await update_in_agent_process(rig, vm, runtime_dir, sid(rig, alt=bool(i % 2)),
                                               "cpr-exec")
        assert result.outcome == Outcome.UPDATED, f"update {i + 1}: {result.message}"
        assert result.pid_after == pid
        results.append(result)
        # What the agent adds for the load is there once, however many updates ran.
        cmdline = procfs.cmdline(pid)
        assert cmdline.count(INCOMING_EVENTS[1]) == 1, cmdline
    vm.serial.assert_continuous()
    for result in results:
        assert_pause_within_blackout(result, vm)


async def test_cpr_transfer_same_version(rig: Rig, vm_factory: VMFactory,
                                         runtime_dir: Path) -> None:
    vm = await started(vm_factory, "backports")
    token = vm.token
    results = []
    for _ in range(3):
        old_pid = vm.pid
        result = await update_in_agent_process(rig, vm, runtime_dir, backports(rig),
                                               "cpr-transfer")
        assert result.outcome == Outcome.UPDATED, result.message
        assert result.mode == CprMode.CPR_TRANSFER
        assert result.pid_after != old_pid and result.pid_after == vm.pid
        assert not procfs.alive(old_pid)
        results.append(result)
    assert vm.token == token
    vm.serial.assert_continuous()
    for result in results:
        assert_pause_within_blackout(result, vm)


async def test_cpr_transfer_across_versions(rig: Rig, vm_factory: VMFactory,
                                            agent: engine.Engine) -> None:
    vm = await started(vm_factory, "backports")
    result = await update(agent, vm, sid(rig), "cpr-transfer",
                          expected_version=rig.qemu("sid").version)
    assert result.outcome == Outcome.UPDATED, result.message
    assert result.version_before == rig.qemu("backports").version
    assert result.version_after == rig.qemu("sid").version
    vm.serial.assert_continuous()
    # The next update starts from the new QEMU, found at the VM's usual socket.
    again = await update(agent, vm, sid(rig), "auto")
    assert again.outcome == Outcome.UPDATED and again.mode == CprMode.CPR_EXEC, again.message
    vm.serial.assert_continuous()


async def test_cpr_reboot(rig: Rig, vm_factory: VMFactory, runtime_dir: Path) -> None:
    vm = await started(vm_factory, "backports", backend="file")
    token = vm.token
    results = []
    for _ in range(3):
        result = await update_in_agent_process(rig, vm, runtime_dir, backports(rig),
                                               "cpr-reboot")
        assert result.outcome == Outcome.UPDATED, result.message
        assert result.mode == CprMode.CPR_REBOOT
        results.append(result)
    assert vm.token == token
    vm.serial.assert_continuous()
    for result in results:
        assert_pause_within_blackout(result, vm)


# mode -> (rig flavour, memory backend, the same update by hand)
RawUpdate = Callable[[TestVM, str, Path], Awaitable[tuple[int, int]]]
PAUSE_CASES: dict[str, tuple[Flavour, Backend, RawUpdate]] = {
    "cpr-exec": ("sid", "memfd", raw_cpr.cpr_exec),
    "cpr-transfer": ("backports", "memfd", raw_cpr.cpr_transfer),
    "cpr-reboot": ("backports", "file", raw_cpr.cpr_reboot),
}
PAUSE_ROUNDS = 7


@pytest.mark.parametrize("mode", list(PAUSE_CASES))
async def test_pause_agrees_with_serial_blackout(mode: str, rig: Rig, vm_factory: VMFactory,
                                                 runtime_dir: Path) -> None:
    """The pause the agent reports (QEMU's STOP -> RESUME) against the blackout seen from
    outside the guest: medians within 20 ms or 20 %.

    The serial gap holds two things the pause does not: one tick period (the guest prints
    every 10 ms of its own time, and its clock stops with the VM) and TCG's cold start in
    the fresh QEMU after RESUME (see raw_cpr). Each of the agent's updates (as its own
    process, as in production) is followed by a hand-made one of the same mode and binary
    on the same VM, which measures that cold start side by side, under the same load."""
    flavour, backend, raw_update = PAUSE_CASES[mode]
    vm = await started(vm_factory, flavour, backend=backend)
    binary = str(rig.qemu(flavour).wrapper)
    token = vm.token
    pauses, gaps, cold_starts = [], [], []
    for i in range(PAUSE_ROUNDS):
        result = await update_in_agent_process(rig, vm, runtime_dir, binary, mode)
        assert result.outcome == Outcome.UPDATED, f"update {i + 1}: {result.message}"
        assert_pause_within_blackout(result, vm)
        assert result.pause_ms is not None
        pauses.append(result.pause_ms)
        gaps.append(serial_gap_at_pause(result, vm))
        raw_dir = vm.workdir / f"raw{i}"
        raw_dir.mkdir()
        stop_ns, resume_ns = await raw_update(vm, binary, raw_dir)
        await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
        cold_starts.append(raw_cpr.cold_start_ms(vm, stop_ns, resume_ns))
    assert vm.token == token
    vm.serial.assert_continuous()
    cold_start = statistics.median(cold_starts)
    blackouts = [gap - raw_cpr.TICK_PERIOD_MS - cold_start for gap in gaps]
    pause, blackout = statistics.median(pauses), statistics.median(blackouts)
    report = (f"{mode}: median pause {pause:.1f} ms (of {pauses}); median serial blackout "
              f"{blackout:.1f} ms (gaps {[round(g, 1) for g in gaps]} less the tick "
              f"{raw_cpr.TICK_PERIOD_MS:.0f} ms and the cold start {cold_start:.1f} ms, the "
              f"median of {[round(c, 1) for c in cold_starts]})")
    print(report)
    assert abs(blackout - pause) <= max(20.0, 0.2 * blackout), report


async def test_cpr_reboot_refused_for_memfd_ram(rig: Rig, vm_factory: VMFactory,
                                                agent: engine.Engine) -> None:
    vm = await started(vm_factory, "backports")
    result = await update(agent, vm, backports(rig), "cpr-reboot")
    assert result.outcome == Outcome.FAILED
    assert "memory-backend-file" in result.message
    vm.serial.assert_continuous()


async def test_auto_chooses_cpr_exec_then_cpr_transfer(rig: Rig, vm_factory: VMFactory,
                                                       agent: engine.Engine) -> None:
    new_vm = await started(vm_factory, "sid")
    old_vm = await started(vm_factory, "backports")
    r1 = await update(agent, new_vm, sid(rig), "auto")
    assert r1.mode == CprMode.CPR_EXEC and "Auto chose cpr-exec" in r1.mode_reason
    r2 = await update(agent, old_vm, sid(rig), "auto")
    assert r2.mode == CprMode.CPR_TRANSFER, r2.mode_reason
    assert "10.2" in r2.mode_reason and rig.qemu("backports").version in r2.mode_reason
    for vm, r in ((new_vm, r1), (old_vm, r2)):
        assert r.outcome == Outcome.UPDATED, r.message
        vm.serial.assert_continuous()


# --- the failure table: each case caught by preflight, and survived without it -------------

FAILURES = {
    # name: (target binary (None: the sid wrapper), extra args, VM options, preflight check)
    "unknown-option": (None, ("-no-such-option",), {}, "dry-run"),
    "exiting-prefix": ("/bin/false", (), {}, "target-version"),
    "other-machine-type": (None, ("-machine", "pc-q35-9.2"), {}, "dry-run"),
    "other-memory-size": (None, ("-m", "512M"), {}, "dry-run"),
    "tap-by-ifname": (None, (), {"netdev_tap_ifname": "vmutap{n}"}, "tap-by-fd"),
}


def _case(rig: Rig, name: str, n: int) -> tuple[str, tuple[str, ...], dict[str, object], str]:
    binary, extra, opts, check = FAILURES[name]
    opts = {k: (v.format(n=n) if isinstance(v, str) else v) for k, v in opts.items()}
    return binary or sid(rig), extra, opts, check


@pytest.mark.parametrize("case", list(FAILURES))
async def test_failure_caught_by_preflight(case: str, rig: Rig, vm_factory: VMFactory,
                                           runtime_dir: Path, built_guard: Path) -> None:
    binary, extra, opts, check = _case(rig, case, 1)
    agent = make_engine(rig, runtime_dir, built_guard, allowed=("/bin", "/usr/bin"))
    vm = await started(vm_factory, "sid", **opts)
    pid = vm.pid
    since = time.monotonic_ns()
    result = await update(agent, vm, binary, "cpr-exec", extra_args=extra)
    assert result.outcome == Outcome.FAILED, result.message
    assert result.preflight is not None
    failed = {c.name for c in result.preflight.failures()}
    assert check in failed, (failed, result.message)
    assert "nothing was changed" in result.message
    # Untouched: same process, never stopped (no blackout beyond the guest's rhythm).
    assert vm.pid == pid
    vm.serial.assert_continuous()
    assert vm.serial.max_gap_ms(since=since) < 200


@pytest.mark.parametrize("case", list(FAILURES))
async def test_failure_recovered_by_the_guard(case: str, rig: Rig, vm_factory: VMFactory,
                                              runtime_dir: Path, built_guard: Path) -> None:
    binary, extra, opts, _ = _case(rig, case, 2)
    # /bin/false must be an allowed target here: skipping preflight never skips that rule.
    agent = make_engine(rig, runtime_dir, built_guard, allowed=("/bin", "/usr/bin"))
    vm = await started(vm_factory, "sid", **opts)
    old_pid, token = vm.pid, vm.token
    result = await agent.update(str(vm.qmp_path), Target(binary=binary, extra_args=extra),
                                RequestedMode.CPR_EXEC, skip_preflight=True)
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert result.pid_after is not None and result.pid_after != old_pid
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    assert vm.pid == result.pid_after
    assert vm.token == token
    vm.serial.assert_continuous()
    async with vm.qmp() as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
    # The recovered VM updates again, cleanly, in its new pid.
    again = await update(agent, vm, sid(rig), "cpr-exec")
    assert again.outcome == Outcome.UPDATED, again.message
    assert again.pid_after == result.pid_after
    vm.serial.assert_continuous()


async def test_missing_binary_fails_safe_inside_qemu(rig: Rig, vm_factory: VMFactory,
                                                     agent: engine.Engine) -> None:
    """QEMU's own exec failure (no such file) resumes the VM in place, guard or not."""
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    result = await agent.update(str(vm.qmp_path),
                                Target(binary=str(Path(rig.share) / "bin" / "no-such-qemu")),
                                RequestedMode.CPR_EXEC, skip_preflight=True, use_guard=False)
    assert result.outcome == Outcome.FAILED, result.message
    assert vm.pid == pid
    await asyncio.sleep(0.3)
    vm.serial.assert_continuous()
    async with vm.qmp() as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"


async def test_cpr_transfer_new_qemu_refuses_argv_old_keeps_running(
        rig: Rig, vm_factory: VMFactory, agent: engine.Engine) -> None:
    vm = await started(vm_factory, "backports")
    pid = vm.pid
    result = await agent.update(str(vm.qmp_path),
                                Target(binary=backports(rig), extra_args=("-no-such-option",)),
                                RequestedMode.CPR_TRANSFER, skip_preflight=True)
    assert result.outcome == Outcome.FAILED, result.message
    assert "no-such-option" in result.message
    assert vm.pid == pid
    await asyncio.sleep(0.3)
    vm.serial.assert_continuous()


async def test_hung_qmp_peer_times_out_with_a_clear_error(rig: Rig, vm_factory: VMFactory,
                                                          runtime_dir: Path) -> None:
    import os
    import signal

    from vmupdate_agent import discovery
    from vmupdate_agent.qmp import QmpTimeout

    vm = await started(vm_factory, "sid")
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(QmpTimeout) as err:
            await discovery.discover(str(vm.qmp_path), timeout=1.0)
        assert time.monotonic() - t0 < 5
        assert str(vm.qmp_path) in str(err.value)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    await vm.serial.wait_ticks(3, after=time.monotonic_ns(), timeout=30)
    info, _ = await discovery.discover(str(vm.qmp_path))
    assert info.runstate == "running"


async def test_target_outside_allowed_dirs_is_never_run(rig: Rig, vm_factory: VMFactory,
                                                        agent: engine.Engine,
                                                        runtime_dir: Path) -> None:
    """Neither preflight (its -version, probe, dry run) nor an update with preflight skipped
    runs a binary from outside the host's allowed directories, even through a symlink."""
    vm = await started(vm_factory, "sid")
    marker = runtime_dir / "was-run"
    outside = runtime_dir / "elsewhere"
    outside.mkdir()
    script = outside / "qemu"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexec {sid(rig)} \"$@\"\n")
    script.chmod(0o755)
    link = Path(rig.share) / "bin" / f"link-{runtime_dir.name}"
    link.symlink_to(script)
    try:
        for binary in (str(script), str(link)):
            report = await agent.preflight(str(vm.qmp_path), Target(binary=binary),
                                           RequestedMode.CPR_EXEC)
            assert not report.passed
            failed = {c.name: c.message for c in report.failures()}
            assert "outside the directories this host allows" in failed[
                "target-allowed-directory"]
            result = await agent.update(str(vm.qmp_path), Target(binary=binary),
                                        RequestedMode.CPR_EXEC, skip_preflight=True)
            assert result.outcome == Outcome.FAILED
            assert "outside the directories this host allows" in result.message
        assert not marker.exists()
    finally:
        link.unlink()
    vm.serial.assert_continuous()


@pytest.mark.parametrize(("mode", "extra", "outcome"), [
    # The new QEMU refuses the command line: it never starts, the old one resumes.
    ("cpr-transfer", ("-no-such-option",), Outcome.FAILED),
    ("cpr-reboot", ("-no-such-option",), Outcome.FAILED),
    # It starts but cannot load the state (another machine): before the old one quits
    # (cpr-transfer) the old one resumes; after it (cpr-reboot) the old binary is started
    # on the saved state.
    ("cpr-transfer", ("-machine", "pc-q35-9.2"), Outcome.FAILED),
    ("cpr-reboot", ("-machine", "pc-q35-9.2"), Outcome.ROLLED_BACK),
], ids=["transfer-refused", "reboot-refused", "transfer-load-fails", "reboot-load-fails"])
async def test_new_process_failures_never_lose_the_vm(
        mode: str, extra: tuple[str, ...], outcome: Outcome, rig: Rig, vm_factory: VMFactory,
        agent: engine.Engine) -> None:
    vm = await started(vm_factory, "backports", backend="file")
    pid, token = vm.pid, vm.token
    result = await agent.update(str(vm.qmp_path),
                                Target(binary=backports(rig), extra_args=extra),
                                RequestedMode(mode), skip_preflight=True)
    assert result.outcome == outcome, result.message
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    if outcome == Outcome.FAILED:
        assert vm.pid == pid  # the old process runs on
    else:
        assert vm.pid == result.pid_after != pid
    assert vm.token == token
    vm.serial.assert_continuous()
    async with vm.qmp() as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
        # Left as it was found: the update's MIGRATION events (and cpr-reboot's
        # x-ignore-shared) are off again in whichever QEMU runs the VM.
        caps = {c["capability"]: c["state"]
                for c in await qmp.execute("query-migrate-capabilities")}
        assert caps["events"] is False and caps["x-ignore-shared"] is False, caps


async def test_pidfile_and_alternating_new_process_modes(rig: Rig, vm_factory: VMFactory,
                                                         agent: engine.Engine) -> None:
    """A VM with -pidfile (QEMU locks it) goes through cpr-transfer and cpr-reboot in turn:
    each new QEMU starts beside the old one, and the pidfile names whoever runs the VM."""
    import secrets

    workdir = rig.vms_dir / f"pidfile-{secrets.token_hex(3)}"
    pidfile = workdir / "qemu.pid"
    vm = await vm_factory("backports", name="pidfile", workdir=workdir, backend="file",
                          extra_args=["-pidfile", str(pidfile)])
    await vm.wait_ticking(90)
    assert pidfile.read_text().strip() == str(vm.pid)
    for mode in ("cpr-transfer", "cpr-reboot", "cpr-transfer", "cpr-reboot"):
        result = await update(agent, vm, backports(rig), mode)
        assert result.outcome == Outcome.UPDATED, f"{mode}: {result.message}"
        assert pidfile.read_text().strip() == str(result.pid_after) == str(vm.pid)
    vm.serial.assert_continuous()


# --- the old binary replaced on disk (a package upgrade) ----------------------------------

WRONG_MACHINE = "pc-q35-9.2"  # a QEMU forced onto it cannot load the VM's state


@pytest.mark.parametrize(("flavour", "mode"), [("sid", "cpr-exec"), ("backports", "cpr-reboot")])
async def test_rollback_runs_the_old_binary_even_when_its_file_was_replaced(
        flavour: Flavour, mode: str, rig: Rig, vm_factory: VMFactory, runtime_dir: Path,
        built_guard: Path) -> None:
    """The usual host update: the package manager replaces the QEMU binary in place, then
    the VMs move onto the new file under the same path. If the new QEMU fails, the way back
    must run the binary the VM ran, not what the path names now (here: a QEMU that cannot
    load the state, which a rollback through the path would start again, losing the VM)."""
    qemu = rig.qemu(flavour)
    bin_dir = runtime_dir / "opt-qemu"
    bin_dir.mkdir()
    path = bin_dir / "qemu-system-x86_64"
    real = qemu.root / qemu.binary.lstrip("/") if qemu.root else Path(qemu.binary)
    shutil.copyfile(real, path)
    path.chmod(0o755)
    agent = make_engine(rig, runtime_dir, built_guard, allowed=(str(bin_dir),))
    vm = await started(vm_factory, flavour, backend="memfd" if mode == "cpr-exec" else "file")
    token = vm.token
    onto_copy = await update(agent, vm, str(path), "cpr-exec" if mode == "cpr-exec"
                             else "cpr-transfer")
    assert onto_copy.outcome == Outcome.UPDATED, onto_copy.message
    assert pathpolicy.origin(procfs.exe(vm.pid)) == str(path)  # a pinned copy of it

    # The "upgrade": another file under the same path.
    upgraded = bin_dir / "upgraded"
    upgraded.write_text(f'#!/bin/sh\nexec {qemu.binary} "$@" -machine {WRONG_MACHINE}\n')
    upgraded.chmod(0o755)
    upgraded.replace(path)
    result = await agent.update(str(vm.qmp_path), Target(binary=str(path)), RequestedMode(mode),
                                skip_preflight=True)
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    assert vm.pid == result.pid_after
    assert vm.token == token
    vm.serial.assert_continuous()
    async with vm.qmp() as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
        version = await qmp.execute("query-version")
    assert f"{version['qemu']['major']}.{version['qemu']['minor']}" in qemu.version
