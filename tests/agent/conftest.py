"""The engine as the agent runs it, with its runtime dir inside the rig's share (which the
sid root sees at the same path), and the guard built once per session."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.rig import Rig, TestVM, start_vm
from vmupdate_agent import engine
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.modes.common import Timeouts, wait_incoming_loaded
from vmupdate_agent.qmp import QmpSession


@pytest.fixture(scope="session")
def built_guard(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cpr_guard.ensure_built(tmp_path_factory.mktemp("guard"))


@pytest.fixture
def runtime_dir(rig: Rig) -> Iterator[Path]:
    d = Path(rig.share) / "agent-test" / uuid.uuid4().hex[:8]
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_engine(rig: Rig, runtime_dir: Path, guard: Path | None, *,
                allowed: tuple[str, ...] = ()) -> engine.Engine:
    guard_path = engine.install_guard(str(runtime_dir), str(guard)) if guard else None
    return engine.Engine(engine.EngineSettings(
        allowed_dirs=(str(Path(rig.share) / "bin"), *allowed),
        runtime_dir=str(runtime_dir), guard_path=guard_path,
        timeouts=Timeouts(command=10, handover=30, load=60, guard_commit=30)))


@pytest.fixture
def agent(rig: Rig, runtime_dir: Path, built_guard: Path) -> engine.Engine:
    return make_engine(rig, runtime_dir, built_guard)


# --- calibrating the serial line as a pause meter ------------------------------------------

TICK_PERIOD_MS = 10.0


async def _raw_cpr_exec_cold_start(vm: TestVM, binary: str, state: Path) -> float:
    """One cpr-exec done by hand (not by the engine): how long after its RESUME the freshly
    started QEMU's guest prints, beyond the rest of the guest's own 10 ms sleep."""
    off = time.time_ns() - time.monotonic_ns()
    old = await QmpSession.open(str(vm.qmp_path))
    await old.cmd("migrate-set-parameters", {"mode": "cpr-exec", "cpr-exec-command": [
        binary, *vm.args, "-S", "-incoming", f"file:{state}"]})
    mark = old.mark()
    await old.cmd("migrate", {"uri": f"file:{state}"})
    stop = await old.wait_event("STOP", since=mark, timeout=10)
    await old.wait_disconnected(10)
    await old.close()
    new = await QmpSession.open_retrying(str(vm.qmp_path), timeout=30)
    try:
        await wait_incoming_loaded(new, 30)
        mark = new.mark()
        await new.cmd("cont")
        resume = await new.wait_event("RESUME", since=mark, timeout=10)
    finally:
        await new.close()
    await vm.serial.wait_ticks(3, after=time.monotonic_ns(), timeout=30)
    ticks = [t.t_ns + off for t in vm.serial.ticks]
    last = max(t for t in ticks if t < stop.qemu_time_ns)
    first = min(t for t in ticks if t > resume.qemu_time_ns)
    remaining_sleep = max(0.0, TICK_PERIOD_MS - (stop.qemu_time_ns - last) / 1e6)
    return (first - resume.qemu_time_ns) / 1e6 - remaining_sleep


@pytest.fixture(scope="session")
def tcg_cold_start_ms(rig: Rig) -> float:
    """Under TCG a freshly started QEMU re-translates the guest's code after RESUME, so the
    guest's first serial line comes later than the end of the pause (measured here: ~30-50
    ms of a core). That is QEMU's, not the update's (KVM has none), and the agent's pause,
    from QEMU's STOP/RESUME, does not contain it: the serial blackout must be corrected by
    it before the two are compared. Median of three hand-made cpr-execs on a rig VM."""
    async def calibrate() -> float:
        vm = await start_vm(rig, "sid", name="calibrate", wait_ticking=True)
        try:
            samples = [await _raw_cpr_exec_cold_start(vm, str(rig.qemu("sid").wrapper),
                                                      vm.workdir / f"cal{i}.state")
                       for i in range(3)]
            vm.serial.assert_continuous()
        finally:
            await vm.stop()
        return statistics.median(samples)

    return asyncio.run(calibrate())
