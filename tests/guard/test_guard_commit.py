"""The agent commits without waiting for the watcher to take the commit, and resumes the
guest right after. So before any rollback the watcher decides on its own (the new QEMU
exited, the agent is gone, the commit timed out) it stops the QEMU and reads the FIFO to its
end: a commit found there wins. Each test holds the watcher (SIGSTOP) while the commit
arrives, so that the decision is taken with the commit still unread, the case a race makes
rare. Stand-in programs, no QEMU needed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guard.test_guard_unit import FakeQmp, Run, run, standin
from vmupdate_agent import guard as guardmod
from vmupdate_agent import procfs


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guardmod.build(tmp_path_factory.mktemp("guard-bin"))


def watching(tmp: Path) -> dict[str, Any]:
    """The watcher's status once it watches the new program, and that program has started
    (it has written its record)."""
    status = guardmod.wait_status(tmp / "status.json", frozenset({guardmod.PHASE_WATCHING}),
                                  timeout=10)
    deadline = time.monotonic() + 10
    while not ((tmp / "new.out").exists() and (tmp / "new.out").stat().st_size):
        assert time.monotonic() < deadline, "the new program never started"
        time.sleep(0.005)
    return status


@contextlib.contextmanager
def watcher_held(tmp: Path) -> Iterator[dict[str, Any]]:
    """The watcher stopped while the body runs: what the body writes to the FIFO is still
    unread when the watcher wakes to what else happened meanwhile."""
    status = watching(tmp)
    os.kill(status["watcher_pid"], signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while state_of(status["watcher_pid"]) != "T":  # the stop lands a moment after the kill
        assert time.monotonic() < deadline, "the watcher does not stop"
        time.sleep(0.001)
    try:
        yield status
    finally:
        os.kill(status["watcher_pid"], signal.SIGCONT)


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def with_agent(guard: Path, tmp: Path, agent: subprocess.Popen[bytes]) -> list[str]:
    return guardmod.guard_command(guard, status=tmp / "status.json", commit=tmp / "commit.fifo",
                                  old_argv=standin(tmp, "old", "exit7"),
                                  new_argv=standin(tmp, "new", "sleep"), commit_timeout=30,
                                  log=tmp / "guard.log",
                                  agent=(agent.pid, procfs.start_time(agent.pid)),
                                  qmp=str(tmp / "qmp.sock"))


def p_jobs(r: Run) -> list[str]:
    return [what for pid, what in r.report["job"] if pid == r.p]


def test_a_commit_unread_when_the_timeout_fires_wins(guard: Path, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def during(r: Run) -> None:
        with watcher_held(tmp_path) as status:
            guardmod.send(r.fifo, "commit")
            time.sleep(0.8)  # past the 0.5 s commit timeout
        guardmod.wait_status(tmp_path / "status.json", timeout=10)
        time.sleep(0.1)  # the harness (P's parent) polls for P's stop and continue
        seen["p_state"] = state_of(status["qemu_pid"])
        os.kill(status["qemu_pid"], signal.SIGKILL)  # the stand-in would sleep on

    r = run(guard, tmp_path, new_act="sleep", action="watch", timeout=0.5, during=during,
            stop_when_p_gone=True, job_control=True)
    st = r.status
    assert st is not None and st["phase"] == "committed" and st["reason"] == "commit", st
    assert "commit-timeout: pid" in r.log and "stopped; reading the commit FIFO" in r.log
    assert "the agent's commit came before commit-timeout could act on it" in r.log, r.log
    assert "killing" not in r.log
    assert r.old == []  # never rolled back
    # P was stopped for the decision and let go again, running when the watcher left
    assert "continued" in p_jobs(r), r.report["job"]
    assert seen["p_state"] in ("R", "S"), seen
    assert r.report["p_status"] == -9  # the test's own kill, not the watcher's


def test_the_timeout_without_a_commit_stops_the_qemu_then_kills_it(guard: Path,
                                                                   tmp_path: Path) -> None:
    r = run(guard, tmp_path, new_act="sleep", timeout=0.5, job_control=True)
    st = r.status
    assert st is not None and st["phase"] == "rolled-back", st
    assert st["reason"] == "commit-timeout"
    # Stopped before the kill: a `cont` sent now would not be acted on.
    stopped = r.log.index("commit-timeout: pid")
    assert stopped < r.log.index("commit-timeout: killing pid"), r.log
    assert len(r.old) == 1 and "continued" not in p_jobs(r)


def test_a_commit_unread_when_the_agent_dies_wins_and_the_watcher_resumes_the_guest(
        guard: Path, tmp_path: Path) -> None:
    agent = subprocess.Popen(["sleep", "3600"])
    qmp = FakeQmp(tmp_path / "qmp.sock")

    def during(r: Run) -> None:
        with watcher_held(tmp_path) as status:
            guardmod.send(r.fifo, "commit")
            agent.kill()
            agent.wait()
        guardmod.wait_status(tmp_path / "status.json", timeout=10)
        deadline = time.monotonic() + 10
        while r.fifo.exists():  # the watcher resumes the guest, then leaves
            assert time.monotonic() < deadline, "the watcher stayed"
            time.sleep(0.005)
        os.kill(status["qemu_pid"], signal.SIGKILL)

    try:
        r = run(guard, tmp_path, cmd=with_agent(guard, tmp_path, agent), action="watch",
                timeout=30, during=during, stop_when_p_gone=True)
    finally:
        agent.kill()
        agent.wait()
        qmp.close()
    st = r.status
    assert st is not None and st["phase"] == "committed", st
    assert st["reason"] == "resumed-by-watcher", st
    assert "the agent's commit came before agent-gone could act on it" in r.log, r.log
    assert qmp.commands[-1] == "cont" and qmp.runstate == "running"
    assert r.old == []


def test_a_new_qemu_that_exited_with_a_commit_unread_is_the_agents_to_abort(
        guard: Path, tmp_path: Path) -> None:
    """The guest may have run in it (the agent's `cont` follows its commit), so the watcher
    does not roll back on its own; the agent, which got no RESUME, says abort."""
    agent = subprocess.Popen(["sleep", "3600"])
    qmp = FakeQmp(tmp_path / "qmp.sock")
    seen: dict[str, Any] = {}

    def during(r: Run) -> None:
        with watcher_held(tmp_path) as status:
            guardmod.send(r.fifo, "commit")
            os.kill(status["qemu_pid"], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while procfs.alive(status["qemu_pid"]):  # reaped by the harness
                assert time.monotonic() < deadline
                time.sleep(0.005)
        seen["committed"] = guardmod.wait_status(tmp_path / "status.json", timeout=10)
        guardmod.send(r.fifo, "abort")

    try:
        r = run(guard, tmp_path, cmd=with_agent(guard, tmp_path, agent), action="watch",
                timeout=30, during=during)
    finally:
        agent.kill()
        agent.wait()
        qmp.close()
    assert seen["committed"]["phase"] == "committed", seen
    assert "the agent's commit came before new-exited could act on it" in r.log, r.log
    st = r.status
    assert st is not None and st["phase"] == "rolled-back", st
    assert st["reason"] == "abort-after-commit"
    [old] = r.old
    assert old["pid"] == st["watcher_pid"] and old["state_offset"] == 0
    assert qmp.commands == []


def test_commit_and_resumed_read_together_let_the_watcher_go(guard: Path,
                                                             tmp_path: Path) -> None:
    """The agent writes `resumed` about a millisecond after `commit`: the watcher may read
    both at once, and must not lose the second (it would stay, holding the VM's descriptors,
    until the commit timeout)."""
    agent = subprocess.Popen(["sleep", "3600"])
    qmp = FakeQmp(tmp_path / "qmp.sock")
    left_after: list[float] = []

    def during(r: Run) -> None:
        with watcher_held(tmp_path) as status:
            guardmod.send(r.fifo, "commit")
            guardmod.send(r.fifo, "resumed")
        t0 = time.monotonic()
        while r.fifo.exists():
            assert time.monotonic() - t0 < 10, "the watcher stayed"
            time.sleep(0.005)
        left_after.append(time.monotonic() - t0)
        os.kill(status["qemu_pid"], signal.SIGKILL)

    try:
        r = run(guard, tmp_path, cmd=with_agent(guard, tmp_path, agent), action="watch",
                timeout=30, during=during, stop_when_p_gone=True)
    finally:
        agent.kill()
        agent.wait()
        qmp.close()
    st = r.status
    assert st is not None and st["phase"] == "committed" and st["reason"] == "commit", st
    assert qmp.commands == []  # the agent resumed the guest; the watcher touched nothing
    assert r.old == []
    assert left_after and left_after[0] < 10
    assert str(st["watcher_pid"]) in r.report["reaped"]


