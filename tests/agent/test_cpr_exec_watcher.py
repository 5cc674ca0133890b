"""How the agent's cpr-exec gets its watcher, on real QEMU: seized before the migrate where
the kernel lets the guard trace the QEMU (one exec inside the pause), in the exec chain
where it does not (here: the QEMU is traced already) or where the agent's configuration
says `cpr_exec_guard: exec-chain`. Either way the VM keeps its pid and its guest, and the
QEMU is left untraced."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from e2e.rig import Rig, TestVM
from e2e.rig.fixtures import VMFactory
from tests.agent.conftest import make_engine
from tests.agent.test_cpr_qemu import sid, started, update
from tests.guard.test_guard_qemu import seize, settled_mask, tracer_of
from vmupdate_agent import engine
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.models import Outcome
from vmupdate_agent.modes.cpr_exec import main_thread_sigmask

pytestmark = pytest.mark.qemu


def last_operation(runtime_dir: Path) -> Path:
    return max((runtime_dir / "ops").iterdir(), key=lambda d: d.stat().st_mtime_ns)


async def updated_in_place(agent: engine.Engine, rig: Rig, vm: TestVM, runtime_dir: Path
                           ) -> tuple[str, dict[str, Any]]:
    """One cpr-exec by `agent`: the VM keeps its pid and the guard takes the commit (the
    agent does not wait for that: it reads it here). The guard's log and status, for how it
    watched."""
    pid = vm.pid
    blocked = f"{await main_thread_sigmask(pid):016x}"
    result = await update(agent, vm, sid(rig), "cpr-exec")
    assert result.outcome == Outcome.UPDATED, result.message
    assert result.pid_after == pid == vm.pid
    # the new QEMU starts with the old one's signal mask, whichever thread exec'd
    assert await settled_mask(pid, blocked) == blocked
    op = last_operation(runtime_dir)
    status = await asyncio.to_thread(cpr_guard.wait_status, op / "guard.status",
                                     frozenset({cpr_guard.PHASE_COMMITTED}), timeout=5)
    assert tracer_of(pid) == 0
    vm.serial.assert_continuous()
    log = (op / "guard.log").read_text()
    assert f"signal mask {blocked}" in log, log  # the agent gave it to the guard
    return log, status


async def test_the_agent_seizes_the_qemu_and_it_execs_the_new_one_directly(
        rig: Rig, vm_factory: VMFactory, agent: engine.Engine, runtime_dir: Path) -> None:
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    log, status = await updated_in_place(agent, rig, vm, runtime_dir)
    assert f"seized pid {pid}" in log and f"pid {pid} exec'd; took" in log, log
    assert status["watcher_pid"] != pid and status["new_execed"]


async def test_a_qemu_traced_already_is_updated_with_the_guard_in_the_exec_chain(
        rig: Rig, vm_factory: VMFactory, agent: engine.Engine, runtime_dir: Path) -> None:
    vm = await started(vm_factory, "sid")
    guard = agent.settings.guard_path
    assert guard is not None
    # A seizer left by some other update (its -incoming state is not this update's).
    other = await seize(vm, guard, "other-update")
    assert other["phase"] == "seized" and tracer_of(vm.pid) == other["watcher_pid"]
    log, _ = await updated_in_place(agent, rig, vm, runtime_dir)
    assert "PTRACE_SEIZE" in log and "committed" in log, log
    # The other seizer saw this update's exec, not its own, and let the QEMU go.
    released = cpr_guard.read_status(vm.workdir / "other-update.status")
    assert released is not None and released["phase"] == cpr_guard.PHASE_RELEASED
    assert released["reason"] == "foreign-exec"


async def test_an_agent_configured_for_the_exec_chain_never_seizes(
        rig: Rig, vm_factory: VMFactory, runtime_dir: Path, built_guard: Path) -> None:
    chained = make_engine(rig, runtime_dir, built_guard)
    chained.settings = replace(chained.settings, guard_seize=False)
    vm = await started(vm_factory, "sid")
    pid = vm.pid
    log, status = await updated_in_place(chained, rig, vm, runtime_dir)
    assert "seize" not in log and "committed" in log, log
    assert status["guard_pid"] == pid and status["watcher_pid"] != pid
