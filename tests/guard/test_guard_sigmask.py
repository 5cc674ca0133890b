"""QEMU may exec its cpr-exec-command from any thread that holds its big lock, and its other
threads block every signal. The guard must see such an exec (seized: every thread is traced)
and start the new QEMU, and the old one of a rollback, with the main thread's signal mask
(--sigmask), not the exec'ing thread's: else the VM's QEMU would be deaf to SIGTERM.
Stand-in programs, no QEMU needed (tests/guard/test_guard_qemu.py runs the real one)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guard.test_guard_unit import STATE_LEN, _records, run, standin
from vmupdate_agent import guard as guardmod
from vmupdate_agent import procfs

HERE = Path(__file__).resolve().parent
THREADED = HERE / "_threaded_qemu.py"
MAIN_MASK = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGALRM - 1))
#: A thread's mask after blocking every signal through glibc, as QEMU's threads do (glibc
#: keeps its two internal signals, 32 and 33, unblocked).
THREAD_MASK = "fffffffe7ffbfeff"


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guardmod.build(tmp_path_factory.mktemp("guard-bin"))


@pytest.mark.parametrize("sigmask", [MAIN_MASK, None], ids=["given", "not-given"])
def test_exec_chain_from_a_thread_that_blocks_every_signal(guard: Path, tmp_path: Path,
                                                           sigmask: int | None) -> None:
    cmd = guardmod.guard_command(
        guard, status=tmp_path / "status.json", commit=tmp_path / "commit.fifo",
        old_argv=standin(tmp_path, "old", "exit7"), new_argv=standin(tmp_path, "new", "exit1"),
        commit_timeout=5, log=tmp_path / "guard.log", sigmask=sigmask)
    r = run(guard, tmp_path, cmd=cmd, exec_from_thread=True)
    st = r.status
    assert st is not None and st["phase"] == "rolled-back" and st["reason"] == "new-exited", st
    [new], [old] = r.new, r.old
    assert new["pid"] == r.p and old["pid"] == st["watcher_pid"]
    if sigmask is None:
        # Both inherit the exec'ing thread's mask: what the option is for.
        assert new["sigblk"] == old["sigblk"] == THREAD_MASK
    else:
        assert int(new["sigblk"], 16) == int(old["sigblk"], 16) == sigmask


class ThreadedQemu:
    """A _threaded_qemu.py process and a seizer of it, both children of the test."""

    def __init__(self, guard: Path, tmp: Path, new_act: str, sigmask: int | None) -> None:
        self.tmp = tmp
        self.status = tmp / "status.json"
        self.fifo = tmp / "commit.fifo"
        ready, self.trigger = tmp / "ready", tmp / "trigger"
        self.qemu = subprocess.Popen([sys.executable, str(THREADED), str(ready),
                                      str(self.trigger), "--",
                                      *standin(tmp, "new", new_act)])
        deadline = time.monotonic() + 10
        while not (ready.exists() and ready.read_text()):
            assert time.monotonic() < deadline, "the stand-in QEMU did not start"
            time.sleep(0.005)
        self.pid = self.qemu.pid
        if sigmask is not None:
            assert procfs.blocked_signals(self.pid) == sigmask  # what the agent reads
        cmd = guardmod.guard_command(
            guard, status=self.status, commit=self.fifo,
            old_argv=standin(tmp, "old", "exit7"), new_argv=standin(tmp, "new", new_act),
            commit_timeout=10, log=tmp / "guard.log", sigmask=sigmask)
        self.seizer = subprocess.Popen(guardmod.seize_command(
            cmd, qemu=(self.pid, procfs.start_time(self.pid))))

    def threads(self) -> list[int]:
        return [int(t.name) for t in Path(f"/proc/{self.pid}/task").iterdir()]

    def tracer(self, tid: int) -> int:
        with open(f"/proc/{self.pid}/task/{tid}/status") as f:
            return int(next(ln for ln in f if ln.startswith("TracerPid:")).split()[1])

    def close(self) -> None:
        for p in (self.qemu, self.seizer):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(10)

    def records(self, which: str) -> list[dict]:
        return _records(self.tmp / f"{which}.out")


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_the_seizer_sees_an_exec_from_any_thread(guard: Path, tmp_path: Path,
                                                 outcome: str) -> None:
    q = ThreadedQemu(guard, tmp_path, "sleep" if outcome == "commit" else "exit1", MAIN_MASK)
    try:
        seized = guardmod.wait_status(q.status, frozenset({"seized", "seize-failed"}),
                                      timeout=10)
        assert seized["phase"] == "seized", seized
        threads = q.threads()
        assert len(threads) >= 4
        assert {q.tracer(t) for t in threads} == {q.seizer.pid}  # every thread traced
        q.trigger.write_text("go")
        if outcome == "commit":
            watching = guardmod.wait_status(q.status, frozenset({"watching"}), timeout=10)
            assert watching["new_execed"] and watching["qemu_pid"] == q.pid
            deadline = time.monotonic() + 10
            while not q.records("new"):
                assert time.monotonic() < deadline, "the new program never started"
                time.sleep(0.005)
            st = guardmod.commit(q.fifo, q.status)
            assert st["phase"] == "committed"
            assert q.seizer.wait(10) == 0
            [new] = q.records("new")
            assert new["pid"] == q.pid
            assert int(new["sigblk"], 16) == MAIN_MASK
            assert q.tracer(q.pid) == 0
            assert q.qemu.poll() is None  # the new program runs on, untraced
        else:
            st = guardmod.wait_status(q.status, timeout=10)
            assert st["phase"] == "rolled-back" and st["reason"] == "new-exited", st
            assert q.qemu.wait(10) == 1
            assert q.seizer.wait(10) == 7  # the seizer's pid became the old program
            [new], [old] = q.records("new"), q.records("old")
            assert new["pid"] == q.pid and old["pid"] == q.seizer.pid
            assert int(new["sigblk"], 16) == MAIN_MASK
            assert int(old["sigblk"], 16) == MAIN_MASK
            assert old["state_offset"] == 0 and new["state_offset"] == STATE_LEN
            assert "100" in old["fds"]  # the RAM memfd, at its number
    finally:
        q.close()


def test_a_bad_sigmask_is_refused_with_its_option_named(guard: Path, tmp_path: Path) -> None:
    cmd = guardmod.guard_command(
        guard, status=tmp_path / "status.json", commit=tmp_path / "commit.fifo",
        old_argv=standin(tmp_path, "old", "exit7"), new_argv=standin(tmp_path, "new", "exit1"))
    cmd[cmd.index("--old-argc"):cmd.index("--old-argc")] = ["--sigmask", "12zz"]
    r = run(guard, tmp_path, cmd=cmd)
    st = r.status
    assert st is not None and st["reason"] == "bad-arguments"
    assert "--sigmask" in st["error"]
    assert r.new == [] and [o["pid"] for o in r.old] == [r.p]  # nothing updated
    with pytest.raises(guardmod.GuardError, match="sigmask"):
        guardmod.guard_command(guard, status="/s", commit="/f", old_argv=["/q", "-incoming", "d"],
                               new_argv=["/q", "-incoming", "d"], sigmask=1 << 64)
