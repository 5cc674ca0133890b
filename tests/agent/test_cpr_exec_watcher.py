"""How the agent's cpr-exec gets its watcher, on real QEMU: seized before the migrate where
the kernel lets the guard trace the QEMU (one exec inside the pause), in the exec chain
where it does not (here: the QEMU is traced already) or where the agent's configuration
says `cpr_exec_guard: exec-chain`. Either way the VM keeps its pid and its guest, and the
QEMU is left untraced."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from e2e.rig import Rig, TestVM
from e2e.rig.fixtures import VMFactory
from e2e.rig.vm import launch_detached
from tests.agent.conftest import make_engine
from tests.agent.test_cpr_qemu import sid, started, update
from vmupdate_agent import engine, procfs
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.models import Outcome

pytestmark = pytest.mark.qemu


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


def last_operation(runtime_dir: Path) -> Path:
    return max((runtime_dir / "ops").iterdir(), key=lambda d: d.stat().st_mtime_ns)


async def test_the_agent_seizes_the_qemu_and_it_execs_the_new_one_directly(
        rig: Rig, vm_factory: VMFactory, agent: engine.Engine, runtime_dir: Path) -> None:
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    result = await update(agent, vm, sid(rig), "cpr-exec")
    assert result.outcome == Outcome.UPDATED, result.message
    assert result.pid_after == pid == vm.pid
    op = last_operation(runtime_dir)
    log = (op / "guard.log").read_text()
    assert f"seized pid {pid}" in log and f"pid {pid} exec'd; took" in log, log
    status = cpr_guard.read_status(op / "guard.status")
    assert status is not None and status["phase"] == cpr_guard.PHASE_COMMITTED, status
    assert status["watcher_pid"] != pid and status["new_execed"]
    assert tracer_of(pid) == 0
    vm.serial.assert_continuous()


async def stale_seizer(vm: TestVM, guard: str, folder: Path) -> dict[str, object]:
    """A seizer left by some other update (its -incoming state is not this update's)."""
    folder.mkdir()
    state = f"file:{folder / 'state'}"
    q = vm.rig.qemu("sid")
    cmd = cpr_guard.seize_command(
        guard, qemu=(vm.pid, procfs.start_time(vm.pid)), status=folder / "guard.status",
        commit=folder / "guard.commit", old_argv=[q.binary, *vm.args, "-incoming", state],
        new_argv=[q.binary, *vm.args, "-S", "-incoming", state], commit_timeout=60,
        log=folder / "guard.log")
    await launch_detached(["nsenter", "--target", str(vm.pid), "--mount", "--root", "--wd",
                           "--", *cmd], cwd=folder, log_path=folder / "launch.log")
    return cpr_guard.wait_status(folder / "guard.status", frozenset({"seized"}), timeout=10)


async def test_a_qemu_traced_already_is_updated_with_the_guard_in_the_exec_chain(
        rig: Rig, vm_factory: VMFactory, agent: engine.Engine, runtime_dir: Path) -> None:
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    guard = agent.settings.guard_path
    assert guard is not None
    other = await stale_seizer(vm, guard, vm.workdir / "other-update")
    assert tracer_of(pid) == other["watcher_pid"]
    result = await update(agent, vm, sid(rig), "cpr-exec")
    assert result.outcome == Outcome.UPDATED, result.message
    assert result.pid_after == pid == vm.pid
    log = (last_operation(runtime_dir) / "guard.log").read_text()
    assert "PTRACE_SEIZE" in log and "committed" in log, log
    # The other seizer saw this update's exec, not its own, and let the QEMU go.
    released = cpr_guard.read_status(vm.workdir / "other-update" / "guard.status")
    assert released is not None and released["phase"] == cpr_guard.PHASE_RELEASED
    assert released["reason"] == "foreign-exec"
    assert tracer_of(pid) == 0
    vm.serial.assert_continuous()


async def test_an_agent_configured_for_the_exec_chain_never_seizes(
        rig: Rig, vm_factory: VMFactory, runtime_dir: Path, built_guard: Path) -> None:
    chained = make_engine(rig, runtime_dir, built_guard)
    chained.settings = replace(chained.settings, guard_seize=False)
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    result = await update(chained, vm, sid(rig), "cpr-exec")
    assert result.outcome == Outcome.UPDATED, result.message
    assert result.pid_after == pid == vm.pid
    op = last_operation(runtime_dir)
    log = (op / "guard.log").read_text()
    assert "seize" not in log and "committed" in log, log
    status = cpr_guard.read_status(op / "guard.status")
    assert status is not None and status["phase"] == cpr_guard.PHASE_COMMITTED, status
    assert status["guard_pid"] == pid and status["watcher_pid"] != pid
    vm.serial.assert_continuous()
