"""The guard under a real QEMU 11 (sid rig) cpr-exec, driven over raw QMP.

Success: new argv with -S -> reconnect, paused + migration completed, commit, cont: same
pid, guest continuous.  Failures (unknown option, /bin/false, other memory size, other
machine type): rolled back into the watcher's pid, guest continuous, same token.
Each both ways the watcher comes: in the exec chain (QEMU execs the guard, which execs the
new QEMU) and seized (the guard started before the migrate traces QEMU's own exec of the
new QEMU). Needs the rig (e2e/rig/provision.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, QMPClient

from e2e.rig import Rig, TestVM, pid_alive, proc_state, qmp_peer_pid, wait_gone
from e2e.rig.vm import launch_detached
from vmupdate_agent import guard as guardmod
from vmupdate_agent import procfs
from vmupdate_agent.modes.cpr_exec import main_thread_sigmask

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session")
def guard_bin(rig: Rig) -> str:
    # the share is bind-mounted at the same path inside the sid root
    return str(guardmod.ensure_built(rig.share / "bin"))


def ev_time(ev: Any) -> float:
    ts = ev["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


async def fast_connect(vm: TestVM, timeout: float = 20.0) -> QMPClient:
    """Reconnect as an agent would: retry every ms until the greeting comes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        c = QMPClient(vm.name)
        try:
            await asyncio.wait_for(c.connect(str(vm.qmp_path)), 1.0)
            return c
        except Exception as e:
            last = e
            with contextlib.suppress(Exception):
                await c.disconnect()
        await asyncio.sleep(0.001)
    raise TimeoutError(f"QMP of {vm.name} did not come back: {last!r}")


@dataclass
class Update:
    pid: int
    state: Path
    status: Path
    fifo: Path
    t_migrate: float  # host realtime just before `migrate`
    stop_ts: float  # STOP event timestamp (old QEMU)
    t_mono_before: int  # monotonic ns before migrate (for serial windows)
    sock_id: tuple[int, int]  # (inode, ctime ns) of the old QEMU's QMP socket file


async def cpr_exec(vm: TestVM, command: list[str], tag: str) -> Update:
    """Set cpr-exec parameters and migrate; returns once the old connection is gone."""
    pid = vm.pid
    state = vm.workdir / f"{tag}.state"
    c = await fast_connect(vm, 10)
    sock_id = sock_identity(vm)
    stop = EventListener(("STOP",))
    c.register_listener(stop)
    try:
        await c.execute("migrate-set-parameters",
                        {"mode": "cpr-exec", "cpr-exec-command": command})
        t_mono = time.monotonic_ns()
        t0 = time.time()
        await c.execute("migrate", {"uri": f"file:{state}"})
        ev = await asyncio.wait_for(stop.get(), 10)
    finally:
        c.remove_listener(stop)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.disconnect(), 5)
    return Update(pid, state, vm.workdir / f"{tag}.status", vm.workdir / f"{tag}.commit", t0,
                  ev_time(ev), t_mono, sock_id)


def sock_identity(vm: TestVM) -> tuple[int, int]:
    st = os.stat(vm.qmp_path)
    return st.st_ino, st.st_ctime_ns


async def wait_new_socket(vm: TestVM, up: Update, timeout: float = 20.0) -> None:
    """Same pid, same path: until the exec, a connection may still reach the OLD QEMU
    (finish-migrate).  The new QEMU binds a new socket file: wait for it to change.  The
    inode number alone is not enough: the freed inode is often reused at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if sock_identity(vm) != up.sock_id:
                return
        await asyncio.sleep(0.0005)
    raise TimeoutError(f"{vm.qmp_path} was not re-created")


def command(vm: TestVM, guard: str | None, tag: str,
            edit: Callable[[list[str]], list[str]] = lambda a: a,
            binary: str | None = None) -> list[str]:
    q = vm.rig.qemu(vm.flavour)
    state = f"file:{vm.workdir / f'{tag}.state'}"
    old = [q.binary, *vm.args, "-incoming", state]
    new = edit([binary or q.alt_binary or q.binary, *vm.args, "-S", "-incoming", state])
    if guard is None:
        return new
    return guardmod.guard_command(
        guard, status=vm.workdir / f"{tag}.status", commit=vm.workdir / f"{tag}.commit",
        old_argv=old, new_argv=new, commit_timeout=20, log=vm.workdir / "guard.log")


WAYS = ["chain", "seized"]


def signals_blocked(pid: int) -> str:
    return f"{procfs.blocked_signals(pid):016x}"


async def settled_mask(pid: int, want: str, timeout: float = 10.0) -> str:
    """The main thread's blocked signals once they are `want`, or the last reading after
    `timeout`: QEMU (and glibc) block every signal for a moment while starting a thread, so
    one reading may catch that moment."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01)):
        if (mask := signals_blocked(pid)) == want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    if mask != want:
        with contextlib.suppress(OSError):
            mask += f" (wchan {Path(f'/proc/{pid}/wchan').read_text()!r}, syscall " \
                    f"{Path(f'/proc/{pid}/syscall').read_text().split()[:1]})"
    return mask


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


async def seize(vm: TestVM, guard: str, tag: str,
                edit: Callable[[list[str]], list[str]] = lambda a: a,
                binary: str | None = None, *, commit_timeout: float = 20) -> dict[str, Any]:
    """Start the guard as a seizer of the VM's QEMU, where the agent starts it: in the QEMU's
    root and working directory, in a session of its own. Returns its status once it has
    seized (or failed to)."""
    cmd = command(vm, guard, tag, edit, binary)
    cmd[cmd.index("--commit-timeout") + 1] = f"{commit_timeout:g}"
    status = vm.workdir / f"{tag}.status"
    seizer = guardmod.seize_command(cmd, qemu=(vm.pid, procfs.start_time(vm.pid)))
    await launch_detached(["nsenter", "--target", str(vm.pid), "--mount", "--root", "--wd",
                           "--", *seizer], cwd=vm.workdir, log_path=vm.workdir / "seize.log")
    return guardmod.wait_status(status, frozenset({"seized", "seize-failed", "released"}),
                                timeout=10)


async def start_update(vm: TestVM, guard: str, tag: str, way: str,
                       edit: Callable[[list[str]], list[str]] = lambda a: a,
                       binary: str | None = None, *, commit_timeout: float = 20) -> Update:
    """One guarded cpr-exec, the watcher coming `way`."""
    if way == "chain":
        cmd = command(vm, guard, tag, edit, binary)
        cmd[cmd.index("--commit-timeout") + 1] = f"{commit_timeout:g}"
        return await cpr_exec(vm, cmd, tag)
    st = await seize(vm, guard, tag, edit, binary, commit_timeout=commit_timeout)
    assert st["phase"] == "seized", st
    assert tracer_of(vm.pid) == st["watcher_pid"]
    return await cpr_exec(vm, command(vm, None, tag, edit, binary), tag)


async def finish_success(vm: TestVM, up: Update, guarded: bool) -> dict[str, float]:
    """Reconnect, check it is the new QEMU paused with the state loaded, commit, cont."""
    await wait_new_socket(vm, up)
    c = await fast_connect(vm)
    resume = EventListener(("RESUME",))
    c.register_listener(resume)
    try:
        t_conn = time.time()
        assert qmp_peer_pid(vm.qmp_path) == up.pid  # same pid
        while True:
            st = await c.execute("query-status")
            mig = await c.execute("query-migrate")
            if st["status"] == "paused" and mig.get("status") == "completed":
                break
            assert st["status"] in ("inmigrate", "paused", "prelaunch"), (st, mig)
            await asyncio.sleep(0.001)
        t_commit = time.time()
        if guarded:
            gs = guardmod.commit(up.fifo, up.status)
            assert gs["phase"] == "committed" and gs["qemu_pid"] == up.pid
        t_cont = time.time()
        await c.execute("cont")
        ev = await asyncio.wait_for(resume.get(), 10)
        st = await c.execute("query-status")
        assert st["status"] == "running"
    finally:
        c.remove_listener(resume)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.disconnect(), 5)
    return {"pause_ms": (ev_time(ev) - up.stop_ts) * 1e3,
            "reconnect_ms": (t_conn - up.stop_ts) * 1e3,
            "commit_ms": (t_cont - t_commit) * 1e3}


async def assert_continuous_after(vm: TestVM, up: Update, token: str) -> float:
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous()
    assert vm.serial.token == token
    return vm.serial.max_gap_ms(since=up.t_mono_before)


@pytest.mark.parametrize("way", WAYS)
async def test_guarded_success_same_pid_continuous(vm_factory, guard_bin: str, way: str
                                                   ) -> None:
    vm = await vm_factory("sid", name=f"gok-{way}", wait_ticking=True)
    token = vm.token
    assert token
    pid = vm.pid
    blocked = f"{await main_thread_sigmask(pid):016x}"
    up = await start_update(vm, guard_bin, "u1", way)
    watching = guardmod.wait_status(up.status, frozenset({"watching"}), timeout=10)
    assert watching["new_execed"] and watching["guard_pid"] == pid
    res = await finish_success(vm, up, guarded=True)
    assert vm.pid == pid and pid_alive(pid)
    assert tracer_of(pid) == 0
    assert await settled_mask(pid, blocked) == blocked
    gap = await assert_continuous_after(vm, up, token)
    st = guardmod.read_status(up.status)
    assert st is not None and st["phase"] == "committed"
    await wait_gone(watching["watcher_pid"], 10)  # the watcher exited and was reaped
    assert not up.fifo.exists()
    # nothing of the guard is left in the new QEMU: no extra children, no guard fds
    kids = [p for p in Path("/proc").iterdir() if p.name.isdigit()
            and (s := proc_state(int(p.name))) is not None and s[1] == pid]
    assert kids == []
    print(f"\nguarded success: {res}, serial gap {gap:.1f} ms, "
          f"guard start->exec new {(st['t_exec_new_ns'] - st['t_guard_ns']) / 1e6:.2f} ms")


def _unknown_option(a: list[str]) -> list[str]:
    return [*a, "-frobnicate-the-vm"]


def _more_memory(a: list[str]) -> list[str]:
    return [*a, "-m", "512M"]


def _other_machine(a: list[str]) -> list[str]:
    return [x.replace("pc-q35-10.0", "pc-q35-9.2") for x in a]


FAILURES: dict[str, tuple[Callable[[list[str]], list[str]], str | None]] = {
    "unknown-option": (_unknown_option, None),
    "bin-false": (lambda a: a, "/bin/false"),
    "other-memory-size": (_more_memory, None),
    "other-machine-type": (_other_machine, None),
}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", sorted(FAILURES))
async def test_guarded_failure_rolls_back(vm_factory, guard_bin: str, case: str, way: str
                                          ) -> None:
    edit, binary = FAILURES[case]
    vm = await vm_factory("sid", name=f"gfail-{case}-{way}", wait_ticking=True)
    token = vm.token
    assert token
    pid = vm.pid
    blocked = f"{await main_thread_sigmask(pid):016x}"
    up = await start_update(vm, guard_bin, "u1", way, edit, binary)
    st = guardmod.wait_status(up.status, timeout=20)
    assert st["phase"] == "rolled-back", st
    assert st["reason"] == "new-exited" and st["guard_pid"] == pid
    w = st["watcher_pid"]
    assert st["qemu_pid"] == w != pid
    assert st["new_exit"] is not None and st["new_exit"].get("code") == 1, st
    # the VM is back, running, in the watcher's pid
    new_pid = await vm.refresh_pid(20)
    assert new_pid == w
    t_back = time.time()
    async with vm.qmp() as q:
        for _ in range(2000):
            status = (await q.execute("query-status"))["status"]
            if status == "running":
                break
            await asyncio.sleep(0.005)
        assert status == "running"
    # It starts with the mask QEMU had, not the guard's nor an exec'ing thread's.
    assert await settled_mask(new_pid, blocked) == blocked
    gap = await assert_continuous_after(vm, up, token)
    await wait_gone(pid, 20)  # the original pid exited and was reaped by its parent
    log = (vm.workdir / "guard.log").read_text()
    print(f"\n{case} ({way}): rolled back into pid {w}; serial gap {gap:.1f} ms; "
          f"stop -> status rolled-back {(st['t_rollback_ns'] / 1e9 - up.stop_ts) * 1e3:.1f} ms;"
          f" stop -> running seen {(t_back - up.stop_ts) * 1e3:.1f} ms; "
          f"new exit {st['new_exit']}")
    assert "rolling back (new-exited)" in log

    # the recovered VM (now in the watcher's pid) updates again, guarded, fine
    up2 = await start_update(vm, guard_bin, "u2", way)
    await finish_success(vm, up2, guarded=True)
    assert vm.pid == w
    await assert_continuous_after(vm, up2, token)


@pytest.mark.parametrize("way", WAYS)
async def test_commit_timeout_rolls_back_paused_vm(vm_factory, guard_bin: str, way: str
                                                   ) -> None:
    """The agent never commits (died): the paused new QEMU is killed, the old one resumes."""
    vm = await vm_factory("sid", name=f"gtimeout-{way}", wait_ticking=True)
    token = vm.token
    assert token
    pid = vm.pid
    up = await start_update(vm, guard_bin, "u1", way, commit_timeout=2)
    st = guardmod.wait_status(up.status, timeout=20)
    assert st["phase"] == "rolled-back" and st["reason"] == "commit-timeout", st
    assert st["new_exit"] == {"wait_status": 9, "signal": 9}
    assert await vm.refresh_pid(20) == st["watcher_pid"] != pid
    gap = await assert_continuous_after(vm, up, token)
    assert 2000 <= gap < 10000


async def test_pause_cost_guarded_vs_plain(vm_factory, guard_bin: str) -> None:
    """Back-to-back updates of one VM: plain (-S, cont) vs guarded (-S, commit, cont)."""
    vm = await vm_factory("sid", name="gcost", wait_ticking=True)
    token = vm.token
    assert token
    res: dict[str, list[float]] = {"plain": [], "guarded": [], "guard_internal": [],
                                   "stop_to_guard": [], "commit_ack": []}
    for i in range(6):
        for kind in ("plain", "guarded"):
            tag = f"{kind}{i}"
            up = await cpr_exec(vm, command(vm, guard_bin if kind == "guarded" else None, tag),
                                tag)
            r = await finish_success(vm, up, guarded=kind == "guarded")
            res[kind].append(r["pause_ms"])
            if kind == "guarded":
                st = guardmod.read_status(up.status)
                assert st is not None
                res["guard_internal"].append((st["t_exec_new_ns"] - st["t_guard_ns"]) / 1e6)
                res["stop_to_guard"].append((st["t_guard_ns"] / 1e9 - up.stop_ts) * 1e3)
                res["commit_ack"].append(r["commit_ms"])
    await assert_continuous_after(vm, up, token)
    assert vm.pid == up.pid
    med = {k: round(statistics.median(v), 2) for k, v in res.items()}
    print(f"\nmedians, ms (n=6; pause = STOP->RESUME event timestamps): {med}")
    print({k: [round(x, 1) for x in v] for k, v in res.items()})


async def test_seizer_lets_go_of_a_qemu_that_does_not_exec(vm_factory, guard_bin: str) -> None:
    """Told `done` before any exec (the migration failed inside QEMU, or was never sent), the
    seizer detaches and exits: the QEMU runs on, untraced, untouched."""
    vm = await vm_factory("sid", name="gseize-done", wait_ticking=True)
    token, pid = vm.token, vm.pid
    st = await seize(vm, guard_bin, "u1")
    assert st["phase"] == "seized", st
    guardmod.send(vm.workdir / "u1.commit", "done")
    st = guardmod.wait_status(vm.workdir / "u1.status", frozenset({"released"}), timeout=10)
    assert st["reason"] == "done"
    await wait_gone(st["watcher_pid"], 10)
    assert tracer_of(pid) == 0 and vm.pid == pid
    await vm.serial.wait_ticks(20, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous()
    assert vm.serial.token == token


async def test_a_traced_qemu_refuses_a_second_seizer(vm_factory, guard_bin: str) -> None:
    """One tracer at a time: the second seizer reports seize-failed and touches nothing, so
    the agent puts the guard in the exec chain instead."""
    vm = await vm_factory("sid", name="gseize-twice", wait_ticking=True)
    first = await seize(vm, guard_bin, "u1")
    assert first["phase"] == "seized", first
    second = await seize(vm, guard_bin, "u2")
    assert second["phase"] == "seize-failed", second
    assert "PTRACE_SEIZE" in second["error"]
    assert tracer_of(vm.pid) == first["watcher_pid"]
    guardmod.send(vm.workdir / "u1.commit", "done")
    guardmod.wait_status(vm.workdir / "u1.status", frozenset({"released"}), timeout=10)
    assert tracer_of(vm.pid) == 0


async def test_a_seizer_takes_no_other_updates_exec(vm_factory, guard_bin: str) -> None:
    """A seizer that outlived its own update (its agent gave up) sees the next update's exec:
    not its -incoming state, so it lets go, and the update finishes under its own guard."""
    vm = await vm_factory("sid", name="gseize-foreign", wait_ticking=True)
    token, pid = vm.token, vm.pid
    stale = await seize(vm, guard_bin, "u0")
    assert stale["phase"] == "seized", stale
    up = await cpr_exec(vm, command(vm, guard_bin, "u1"), "u1")
    st = guardmod.wait_status(vm.workdir / "u0.status", frozenset({"released"}), timeout=10)
    assert st["reason"] == "foreign-exec", st
    await finish_success(vm, up, guarded=True)
    assert vm.pid == pid
    await assert_continuous_after(vm, up, token)
