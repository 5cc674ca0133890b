"""Pause by mode, memory backend and RAM size, on real QEMU (the rig's VMs).

One VM per case. A CPR case alternates, round by round on that VM, the agent (its CLI, a
process of its own as in production) and the hand-made minimal QMP sequence of the same
mode (`tests/agent/raw_cpr.py`), and measures the floor (the new QEMU's start-up with the
VM's argv) between them. Before its counted rounds a CPR case makes one update by hand, not
counted: a QEMU's first update is slower (at 8 GiB a fresh QEMU's first cpr-exec took
19-23 ms to save its state, against 9), and the rotation would otherwise always give it to
the same method. The hand-made sequence starts only as long after the previous update as
the agent takes from its launch to the guest's STOP (`hand_wait_ms`): a guest stopped
later pauses longer, whoever stops it.
A `plain` case live-migrates the VM, copying its RAM. Every pause
is QEMU's own RESUME - STOP. The guest is checked at the end of every case: same boot
token, counter contiguous, RAM checksums good.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from e2e.rig import Rig, TestVM
from e2e.rig.config import Flavour
from e2e.rig.vm import Backend, start_vm
from tests.agent import raw_cpr
from vmupdate_agent.models import Outcome, UpdateResult

from . import plain, records

Method = Literal["cpr-exec", "cpr-transfer", "cpr-reboot", "plain"]
METHODS: tuple[Method, ...] = ("cpr-exec", "cpr-transfer", "cpr-reboot", "plain")
RawUpdate = Callable[[TestVM, str, Path], Awaitable[tuple[int, int]]]
HANDMADE: dict[str, RawUpdate] = {
    "cpr-exec": raw_cpr.cpr_exec,
    "cpr-transfer": raw_cpr.cpr_transfer,
    "cpr-reboot": raw_cpr.cpr_reboot,
}
AGENT_TIMEOUT = 900.0


@dataclass(frozen=True)
class Case:
    method: Method
    backend: Backend
    mem_mib: int

    @property
    def name(self) -> str:
        return f"{self.method}/{self.backend}/{self.mem_mib}M"


def plan_cases(methods: list[Method], backends: list[Backend], sizes_mib: list[int]
               ) -> list[Case]:
    """Every method x backend x size that QEMU can do: cpr-reboot only with RAM in a file
    (a memfd dies with the process)."""
    return [Case(m, b, s) for s in sizes_mib for m in methods for b in backends
            if not (m == "cpr-reboot" and b == "memfd")]


# What the rig guest writes into its RAM (e2e/rig/guest/ticker.c fills and checks a 32 MiB
# buffer; its kernel, from the distribution's cloud image, has no page poisoning to fill
# free memory at boot). The rest of a large guest's RAM stays untouched: for memfd and
# /dev/shm it is never allocated on the host until something reads or writes it.
GUEST_TOUCHED_MIB = 32
HEADROOM_MIB = 1024  # for the host itself and the other processes of the run


def ram_needed_mib(case: Case) -> int:
    """Host RAM a case may need at its peak: a plain migration holds two copies of guest RAM
    (the new QEMU's, and the old one's, which the migration reads through); a CPR case one
    (the new QEMU maps the same memory), plus the floor's QEMU, which never touches its own."""
    copies = 2 if case.method == "plain" else 1
    return copies * case.mem_mib + HEADROOM_MIB


def room_problem(case: Case, available_mib: int) -> str | None:
    """Why the host cannot run `case` now (MemAvailable), naming the option to change."""
    need = ram_needed_mib(case)
    if need <= available_mib:
        return None
    return (f"{case.name} needs about {need} MiB of host RAM (a plain migration holds two "
            f"copies of guest RAM) and {available_mib} MiB are available: leave "
            f"{case.mem_mib} out of --sizes, or run it on a quieter or larger host")


def available_mib(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise ValueError("no MemAvailable line in /proc/meminfo")


def empty_series() -> dict[str, list[float]]:
    return {"agent_pause_ms": [], "handmade_pause_ms": [], "floor_ms": [],
            "agent_unguarded_pause_ms": [], "plain_pause_ms": [], "plain_total_ms": [],
            "agent_lead_ms": [], "handmade_wait_ms": []}


# The hand-made sequence's wait before its first command, until the agent's lead of this case
# is known (a typical lead on this machine; see `hand_wait_ms`).
DEFAULT_LEAD_MS = 200.0


def hand_wait_ms(agent_leads_ms: list[float]) -> float:
    """How long the hand-made sequence waits before it starts, so that it stops the guest as
    long after the previous update as the agent does: the median of the agent's leads so far
    in this case (its launch to QEMU's STOP: start-up, discovery, preflight). A VM stopped
    250 ms later than another paused 3.5 ms longer in a cpr-exec (12 rounds, 256 MiB; the
    new QEMU's start was slower), which would otherwise count against the agent."""
    return statistics.median(agent_leads_ms) if agent_leads_ms else DEFAULT_LEAD_MS


async def agent_update(rig: Rig, vm: TestVM, runtime_dir: Path, binary: str, mode: str,
                       *, guard: bool = True) -> UpdateResult:
    """One update by the agent's CLI, as its own process (`guard=False`: cpr-exec without
    the guard, to tell its share of the pause from the agent's own)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmupdate_agent.cli", "--allowed-dir",
        str(Path(rig.share) / "bin"), "--runtime-dir", str(runtime_dir), "--json", "update",
        str(vm.qmp_path), "--binary", binary, "--mode", mode,
        *(() if guard else ("--no-guard",)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), AGENT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if not out:
        raise RuntimeError(f"the agent printed no result (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[-1000:]}")
    return UpdateResult.model_validate_json(out)


async def _settle(vm: TestVM) -> None:
    """Let the guest print on the other side before the next round."""
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=120)


async def _accelerator(vm: TestVM) -> str:
    async with vm.qmp() as q:
        answer = await q.execute("query-kvm")
    assert isinstance(answer, dict)
    return records.accelerator(answer)


async def _cpr_round(rig: Rig, vm: TestVM, case: Case, binary: str, runtime_dir: Path,
                     i: int, series: dict[str, list[float]], phases: list[dict[str, float]]
                     ) -> None:
    async def by_agent(guard: bool = True) -> None:
        launched = time.time_ns()
        result = await agent_update(rig, vm, runtime_dir, binary, case.method, guard=guard)
        if result.outcome != Outcome.UPDATED or result.pause_ms is None:
            raise RuntimeError(f"{case.name} round {i}: the agent did not update: "
                               f"{result.outcome} {result.message}")
        if result.paused_at_ns is not None:
            series["agent_lead_ms"].append((result.paused_at_ns - launched) / 1e6)
        if guard:
            series["agent_pause_ms"].append(result.pause_ms)
            phases.append(dict(result.phase_ms))
        else:
            series["agent_unguarded_pause_ms"].append(result.pause_ms)
        await _settle(vm)

    async def by_agent_unguarded() -> None:
        await by_agent(guard=False)

    async def by_hand() -> None:
        workdir = vm.workdir / f"hand{i}"
        workdir.mkdir()
        wait_ms = hand_wait_ms(series["agent_lead_ms"])
        series["handmade_wait_ms"].append(wait_ms)
        await asyncio.sleep(wait_ms / 1000)
        stop, resume = await HANDMADE[case.method](vm, binary, workdir)
        series["handmade_pause_ms"].append((resume - stop) / 1e6)
        await _settle(vm)

    # Rotate which goes first, so none always follows another's after-effects. cpr-exec also
    # runs without its guard: what the guard costs, apart from the agent's own work.
    steps = [by_agent, by_hand] + ([by_agent_unguarded] if case.method == "cpr-exec" else [])
    for step in steps[i % len(steps):] + steps[:i % len(steps)]:
        await step()
    series["floor_ms"].append(await plain.startup_floor(vm, binary, vm.workdir / f"floor{i}"))


async def _warm_up(vm: TestVM, case: Case, binary: str) -> float:
    """One update by hand, not counted (see the module's docstring); its pause."""
    workdir = vm.workdir / "warm-up"
    workdir.mkdir()
    stop, resume = await HANDMADE[case.method](vm, binary, workdir)
    await _settle(vm)
    return (resume - stop) / 1e6


async def _plain_round(vm: TestVM, binary: str, i: int, series: dict[str, list[float]]
                       ) -> None:
    workdir = vm.workdir / f"plain{i}"
    workdir.mkdir()
    issued, stop, resume = await plain.plain_migration(vm, binary, workdir)
    series["plain_pause_ms"].append((resume - stop) / 1e6)
    series["plain_total_ms"].append((resume - issued) / 1e6)
    await _settle(vm)


async def run_case(rig: Rig, case: Case, *, flavour: Flavour, rounds: int,
                   runtime_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """All rounds of one case on one fresh VM; the record of it (raw samples)."""
    with open("/proc/meminfo") as f:
        problem = room_problem(case, available_mib(f.read()))
    if problem is not None:
        raise RuntimeError(problem)
    q = rig.qemu(flavour)
    binary = str(q.wrapper)
    series: dict[str, list[float]] = empty_series()
    phases: list[dict[str, float]] = []
    vm = await start_vm(rig, flavour, name=f"bench-{case.method}", mem_mib=case.mem_mib,
                        backend=case.backend, boot_timeout=600)
    try:
        token = await vm.wait_ticking(600)
        accel = await _accelerator(vm)
        warm_up_ms = None if case.method == "plain" else await _warm_up(vm, case, binary)
        if warm_up_ms is not None:
            log(f"{case.name} warm-up (by hand, not counted): {warm_up_ms:.1f}")
        for i in range(rounds):
            if case.method == "plain":
                await _plain_round(vm, binary, i, series)
            else:
                await _cpr_round(rig, vm, case, binary, runtime_dir, i, series, phases)
            log(f"{case.name} round {i + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]:.1f}" for k, v in series.items() if v))
        vm.serial.assert_continuous()
        guest_ok = vm.token == token
        if not guest_ok:
            raise RuntimeError(f"{case.name}: the guest rebooted (token {token} -> {vm.token})")
    finally:
        await vm.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(vm.workdir)
    return {**asdict(case), "flavour": flavour, "qemu_version": q.version,
            "accelerator": accel, "rounds": rounds, "series": series, "phase_ms": phases,
            "warm_up_pause_ms": warm_up_ms,
            "guest_checked": guest_ok, "guest_touched_mib": min(GUEST_TOUCHED_MIB, case.mem_mib)}
