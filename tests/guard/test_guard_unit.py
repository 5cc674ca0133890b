"""The cpr-exec guard with real processes and stand-in "QEMU" programs (no QEMU needed).

Each scenario runs _harness.py, which plays QEMU at the moment of cpr-exec (fds, env,
a CPR state memfd whose offset is at the end) and execs the guard as process P. The
stand-ins (_standin.py) record pid, argv, env, open fds and the state fd's offset.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmupdate_agent import guard as guardmod
from vmupdate_agent import procfs

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "_harness.py"
STANDIN = HERE / "_standin.py"
PY = sys.executable
STATE_LEN = len(b"QEMU-CPR-STATE:") + 256 * 16


@pytest.fixture(scope="session")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guardmod.build(tmp_path_factory.mktemp("guard-bin"))


@dataclass
class Run:
    tmp: Path
    cmd: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] | None = None
    new: list[dict[str, Any]] = field(default_factory=list)
    old: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    log: str = ""

    @property
    def p(self) -> int:
        return int(self.report["p_pid"])

    @property
    def fifo(self) -> Path:
        return self.tmp / "commit.fifo"


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def standin(tmp: Path, which: str, act: str) -> list[str]:
    return [PY, str(STANDIN), "--out", str(tmp / f"{which}.out"), "--act", act,
            "-incoming", "defer"]


def run(
    guard: Path,
    tmp: Path,
    *,
    old_act: str = "exit7",
    new_act: str = "exit1",
    old_argv: list[str] | None = None,
    new_argv: list[str] | None = None,
    cmd: list[str] | None = None,
    timeout: float = 5.0,
    action: str | None = None,
    during: Callable[[Run], None] | None = None,
    **spec: Any,
) -> Run:
    old_argv = old_argv or standin(tmp, "old", old_act)
    new_argv = new_argv or standin(tmp, "new", new_act)
    status, fifo, log = tmp / "status.json", tmp / "commit.fifo", tmp / "guard.log"
    if cmd is None:
        cmd = guardmod.guard_command(guard, status=status, commit=fifo, old_argv=old_argv,
                                     new_argv=new_argv, commit_timeout=timeout, log=log)
    r = Run(tmp=tmp, cmd=cmd)
    full = {"argv": cmd, "stdout": str(tmp / "stdout"), "stderr": str(tmp / "stderr"),
            "new_out": str(tmp / "new.out"), "fifo": str(fifo), "action": action,
            "timeout": timeout + 15, **spec}
    h = subprocess.Popen([PY, str(HARNESS), json.dumps(full)], stdout=subprocess.PIPE,
                         text=True)
    if during is not None:
        during(r)
    out, _ = h.communicate(timeout=timeout + 30)
    assert h.returncode == 0, out
    r.report = json.loads(out)
    r.status = guardmod.read_status(status)
    r.new = _records(tmp / "new.out")
    r.old = _records(tmp / "old.out")
    r.stderr = (tmp / "stderr").read_text() if (tmp / "stderr").exists() else ""
    r.log = log.read_text() if log.exists() else ""
    return r


def assert_same_fds_env(r: Run, rec: dict[str, Any]) -> None:
    """The program sees exactly the fds and env P was given: nothing of the guard's."""
    assert sorted(int(fd) for fd in rec["fds"]) == r.report["passed_fds"]
    for fd, ident in r.report["fd_ids"].items():
        assert rec["fds"][fd][:2] == ident, f"fd {fd} is another file"
        assert rec["fds"][fd][2] is True
    assert rec["env"] == r.report["env"]


def assert_clean(r: Run) -> None:
    assert r.report["left"] == [], "processes left behind"
    assert not r.fifo.exists(), "commit FIFO left behind"
    leftovers = [p.name for p in r.tmp.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------- rollback paths


def test_new_exits_rolls_back_in_watcher_pid(guard: Path, tmp_path: Path) -> None:
    r = run(guard, tmp_path)
    st = r.status
    assert st is not None, r.stderr
    w = st["watcher_pid"]
    assert st["phase"] == "rolled-back" and st["reason"] == "new-exited"
    assert st["guard_pid"] == r.p and st["qemu_pid"] == w and w != r.p
    assert st["new_execed"] is True
    assert st["new_exit"] == {"wait_status": 256, "code": 1}
    assert st["error"] is None
    assert st["state_fd"] == int(r.report["env"]["QEMU_CPR_EXEC_STATE"])
    ts = [st[k] for k in ("t_guard_ns", "t_ready_ns", "t_exec_new_ns", "t_event_ns",
                          "t_rollback_ns")]
    assert ts == sorted(ts) and all(ts)

    # the new program ran in P, got the state at the offset QEMU left it
    [new] = r.new
    assert new["pid"] == r.p
    assert new["argv"] == standin(tmp_path, "new", "exit1")[1:]
    assert new["state_offset"] == STATE_LEN
    assert_same_fds_env(r, new)

    # the old program ran in the watcher's pid, with the same fds/env and the state rewound
    [old] = r.old
    assert old["pid"] == w
    assert old["ppid"] == r.report["harness_pid"]  # reparented to the subreaper
    assert old["argv"] == standin(tmp_path, "old", "exit7")[1:]
    assert old["state_offset"] == 0
    assert old["state_head"] == "QEMU-CPR-STATE:"
    assert_same_fds_env(r, old)

    assert r.report["p_status"] == 1
    assert r.report["reaped"][str(w)] == 7  # the watcher pid became the old program
    assert "rolling back (new-exited)" in r.log
    assert_clean(r)


def test_commit_timeout_kills_new_and_rolls_back(guard: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = run(guard, tmp_path, new_act="sleep", timeout=0.5)
    assert time.monotonic() - t0 < 10
    st = r.status
    assert st is not None
    assert st["phase"] == "rolled-back" and st["reason"] == "commit-timeout"
    assert st["new_exit"] == {"wait_status": 9, "signal": 9}
    assert st["t_kill_ns"] and st["t_kill_ns"] >= st["deadline_ns"]
    assert st["deadline_ns"] - st["t_ready_ns"] == 500_000_000
    assert r.report["p_status"] == -9
    [old] = r.old
    assert old["pid"] == st["watcher_pid"] == st["qemu_pid"]
    assert old["state_offset"] == 0
    assert_same_fds_env(r, old)
    assert "commit-timeout: killing pid" in r.stderr
    assert_clean(r)


def test_abort_kills_new_and_rolls_back(guard: Path, tmp_path: Path) -> None:
    r = run(guard, tmp_path, new_act="sleep", action="abort", timeout=30)
    st = r.status
    assert st is not None
    assert st["phase"] == "rolled-back" and st["reason"] == "abort"
    assert st["new_exit"] == {"wait_status": 9, "signal": 9}
    [old] = r.old
    assert old["pid"] == st["watcher_pid"]
    assert_clean(r)


def test_exit_code_found_while_p_is_a_zombie(guard: Path, tmp_path: Path) -> None:
    # P's parent does not reap at once: the watcher reads the code from /proc
    r = run(guard, tmp_path, reap_delay=0.5)
    st = r.status
    assert st is not None and st["phase"] == "rolled-back"
    assert st["new_exit"] == {"wait_status": 256, "code": 1}


def test_sigchld_ignored_in_qemu(guard: Path, tmp_path: Path) -> None:
    r = run(guard, tmp_path, ignore_sigchld=True)
    assert r.status is not None and r.status["phase"] == "rolled-back"
    assert [o["pid"] for o in r.old] == [r.status["watcher_pid"]]
    assert_clean(r)


def test_without_state_env(guard: Path, tmp_path: Path) -> None:
    r = run(guard, tmp_path, no_state_env=True)
    assert r.status is not None and r.status["phase"] == "rolled-back"
    assert r.status["state_fd"] is None
    assert "QEMU_CPR_EXEC_STATE is not set" in r.stderr
    assert len(r.old) == 1


# ---------------------------------------------------------------- success path


def test_commit_watcher_exits_and_nothing_else_runs(guard: Path, tmp_path: Path) -> None:
    r = run(guard, tmp_path, new_act="sleep", action="commit", timeout=30)
    st = r.status
    assert st is not None
    assert st["phase"] == "committed" and st["reason"] == "commit"
    assert st["qemu_pid"] == r.p and st["t_commit_ns"] and st["new_exit"] is None
    w = st["watcher_pid"]
    assert r.report["reaped"][str(w)] == 0  # watcher exited by itself
    assert r.report["p_children"] == []  # no zombie of the intermediate child under QEMU
    assert r.report["p_children_after_commit"] == []
    assert r.report["p_alive_after_commit"] is True
    assert r.old == []  # the old program never ran
    [new] = r.new
    assert new["pid"] == r.p
    assert_same_fds_env(r, new)
    assert_clean(r)


def test_protocol_helpers_live(guard: Path, tmp_path: Path) -> None:
    """While the new program runs: status says watching; commit() gets the ack."""
    seen: dict[str, Any] = {}

    def during(r: Run) -> None:
        deadline = time.monotonic() + 10
        while not (tmp_path / "new.out").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        seen["watching"] = guardmod.read_status(tmp_path / "status.json")
        w = seen["watching"]["watcher_pid"]
        seen["watcher_comm"] = Path(f"/proc/{w}/comm").read_text().strip()
        seen["watcher_fds"] = sorted(int(x) for x in os.listdir(f"/proc/{w}/fd"))
        seen["fifo_mode"] = os.stat(tmp_path / "commit.fifo").st_mode
        seen["ack"] = guardmod.commit(tmp_path / "commit.fifo", tmp_path / "status.json")
        with pytest.raises(guardmod.WatcherGone):
            guardmod.send(tmp_path / "commit.fifo", "commit")

    r = run(guard, tmp_path, new_act="sleep", action="watch", timeout=30, during=during,
            stop_when_p_gone=True)
    w0 = seen["watching"]
    assert w0["phase"] == "watching" and w0["new_execed"] is True
    assert w0["qemu_pid"] == w0["guard_pid"] == r.p
    assert seen["watcher_comm"] == "cpr-guard-watch"
    assert stat.S_ISFIFO(seen["fifo_mode"])
    # watcher: P's fds + pidfd + FIFO read/write ends (+ log, + /proc reads closed)
    assert set(r.report["passed_fds"]) <= set(seen["watcher_fds"])
    assert len(seen["watcher_fds"]) == len(r.report["passed_fds"]) + 4
    assert seen["ack"]["phase"] == "committed"
    assert r.old == []


def test_preexisting_fifo(guard: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "commit.fifo", 0o600)
    r = run(guard, tmp_path, new_act="sleep", action="commit", timeout=30)
    assert r.status is not None and r.status["phase"] == "committed"
    assert_clean(r)


# ---------------------------------------------------------------- fail-safe paths


def test_new_binary_missing_old_runs_in_same_pid(guard: Path, tmp_path: Path) -> None:
    new = ["/nonexistent/qemu-system-x86_64", "-incoming", "defer"]
    r = run(guard, tmp_path, new_argv=new)
    st = r.status
    assert st is not None
    assert st["phase"] == "rolled-back" and st["reason"] == "exec-new-failed"
    assert st["qemu_pid"] == r.p  # no pid change: fell back in place
    assert "No such file or directory" in st["error"]
    [old] = r.old
    assert old["pid"] == r.p and old["state_offset"] == 0
    assert_same_fds_env(r, old)
    assert r.report["p_status"] == 7
    assert r.report["reaped"][str(st["watcher_pid"])] == 0  # watcher stood down
    assert r.new == []
    assert_clean(r)


def test_watcher_cannot_start_old_runs_in_same_pid(guard: Path, tmp_path: Path) -> None:
    old, new = standin(tmp_path, "old", "exit7"), standin(tmp_path, "new", "exit1")
    cmd = guardmod.guard_command(guard, status=tmp_path / "status.json",
                                 commit=tmp_path / "no-such-dir" / "fifo", old_argv=old,
                                 new_argv=new)
    r = run(guard, tmp_path, cmd=cmd)
    st = r.status
    assert st is not None
    assert st["phase"] == "rolled-back" and st["reason"] == "watcher-failed"
    assert st["qemu_pid"] == r.p
    assert "mkfifo" in st["error"] and "No such file or directory" in st["error"]
    assert [o["pid"] for o in r.old] == [r.p]
    assert r.new == []
    assert "not updating" in r.stderr


def test_relative_new_binary_falls_back(guard: Path, tmp_path: Path) -> None:
    old = standin(tmp_path, "old", "exit7")
    cmd = [str(guard), "--status", str(tmp_path / "status.json"), "--commit",
           str(tmp_path / "commit.fifo"), "--", *old, "--", "qemu-system-x86_64",
           "-incoming", "defer"]
    r = run(guard, tmp_path, cmd=cmd)
    assert r.status is not None
    assert r.status["phase"] == "rolled-back" and r.status["reason"] == "bad-arguments"
    assert "not an absolute path" in r.stderr
    assert [o["pid"] for o in r.old] == [r.p] and r.new == []


def test_unknown_option_falls_back(guard: Path, tmp_path: Path) -> None:
    old, new = standin(tmp_path, "old", "exit7"), standin(tmp_path, "new", "exit1")
    cmd = [str(guard), "--status", str(tmp_path / "status.json"), "--commit",
           str(tmp_path / "commit.fifo"), "--frobnicate", "1", "--", *old, "--", *new]
    r = run(guard, tmp_path, cmd=cmd)
    assert "unknown option '--frobnicate'" in r.stderr
    assert r.status is not None and r.status["reason"] == "bad-arguments"
    assert [o["pid"] for o in r.old] == [r.p] and r.new == []


@pytest.mark.parametrize("layout", ["no-separator", "old-without-incoming", "old-relative"])
def test_no_way_back_refuses(guard: Path, tmp_path: Path, layout: str) -> None:
    old, new = standin(tmp_path, "old", "exit7"), standin(tmp_path, "new", "exit1")
    head = [str(guard), "--status", str(tmp_path / "status.json"), "--commit",
            str(tmp_path / "commit.fifo")]
    if layout == "no-separator":
        cmd = [*head, *old, *new]
    elif layout == "old-without-incoming":
        cmd = [*head, "--", *old[:-2], "--", *new]
    else:
        cmd = [*head, "--", "python3", *old[1:], "--", *new]
    r = run(guard, tmp_path, cmd=cmd)
    assert r.report["p_status"] == 2
    assert "bad arguments" in r.stderr and "usage:" in r.stderr
    assert r.old == [] and r.new == []
    assert r.status is not None and r.status["phase"] == "rollback-failed"
    assert r.status["qemu_pid"] is None


def test_old_argc_allows_double_dash_in_old_argv(guard: Path, tmp_path: Path) -> None:
    old = [*standin(tmp_path, "old", "exit7"), "-name", "--"]
    r = run(guard, tmp_path, old_argv=old)
    assert "--old-argc" in r.cmd
    [rec] = r.old
    assert rec["argv"] == old[1:]
    assert rec["pid"] == r.status["watcher_pid"] if r.status else False


def test_check_mode(guard: Path, tmp_path: Path) -> None:
    old, new = standin(tmp_path, "old", "exit7"), standin(tmp_path, "new", "exit1")
    cmd = guardmod.guard_command(guard, status=tmp_path / "s", commit=tmp_path / "f",
                                 old_argv=old, new_argv=new)
    guardmod.check(cmd)
    res = subprocess.run([cmd[0], "--check", *cmd[1:]], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "ok\n"
    bad = guardmod.guard_command(guard, status=tmp_path / "s", commit=tmp_path / "f",
                                 old_argv=old, new_argv=["/nonexistent/q", "-incoming", "x"])
    with pytest.raises(guardmod.GuardError, match=r"new binary /nonexistent/q"):
        guardmod.check(bad)
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()
    assert not (tmp_path / "old.out").exists() and not (tmp_path / "new.out").exists()


def test_guard_command_validation(guard: Path) -> None:
    with pytest.raises(guardmod.GuardError, match="absolute"):
        guardmod.guard_command(guard, status="/s", commit="/f", old_argv=["q", "-incoming", "d"],
                               new_argv=["/q", "-incoming", "d"])
    with pytest.raises(guardmod.GuardError, match="no -incoming"):
        guardmod.guard_command(guard, status="/s", commit="/f", old_argv=["/q"],
                               new_argv=["/q", "-incoming", "d"])


# ---------------------------------------------------------------- build


def test_build_flags_match_build_sh() -> None:
    text = (Path(guardmod.__file__).parent / "build.sh").read_text()
    m = re.search(r'^CFLAGS="([^"]*)"', text, re.M)
    assert m and tuple(shlex.split(m.group(1))) == guardmod.CFLAGS


def test_build_sh_and_ensure_built(tmp_path: Path) -> None:
    sh = Path(guardmod.__file__).parent / "build.sh"
    res = subprocess.run([str(sh), str(tmp_path / "a")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    built = tmp_path / "a" / guardmod.GUARD_NAME
    assert res.stdout.strip() == str(built)
    assert guardmod.built_version(built) == guardmod.source_digest()
    g = guardmod.ensure_built(tmp_path / "a")
    assert g == built and g.stat().st_mtime_ns == built.stat().st_mtime_ns
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [guardmod.GUARD_NAME]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / guardmod.GUARD_NAME).write_text("#!/bin/sh\necho old\n")
    os.chmod(tmp_path / "b" / guardmod.GUARD_NAME, 0o755)
    g2 = guardmod.ensure_built(tmp_path / "b")
    assert guardmod.built_version(g2) == guardmod.source_digest()
    # static: runs in any root
    assert b"ld-linux" not in g2.read_bytes()[:4096]


# ---------------------------------------------------------------- cost


STAMP_C = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec); fclose(f);
    if (argc > 2 && argv[2][0] == 'p') pause();
    return 0;
}
"""


def test_cost_on_the_pause(guard: Path, tmp_path: Path) -> None:
    """Guard start -> exec of the new binary, and launch -> new start, guarded vs direct."""
    (tmp_path / "stamp.c").write_text(STAMP_C)
    stamp = tmp_path / "stamp"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(stamp), str(tmp_path / "stamp.c")],
                   check=True)
    internal, guarded, direct = [], [], []
    for i in range(12):
        d = tmp_path / f"g{i}"
        d.mkdir()
        new = [str(stamp), str(d / "new.out"), "p", "-incoming", "defer"]
        r = run(guard, d, new_argv=new, action="commit", timeout=30)
        assert r.status is not None and r.status["phase"] == "committed"
        t_new = int((d / "new.out").read_text())
        internal.append(r.status["t_exec_new_ns"] - r.status["t_guard_ns"])
        guarded.append(t_new - r.report["t_launch"])
        d2 = tmp_path / f"d{i}"
        d2.mkdir()
        r2 = run(guard, d2, cmd=[str(stamp), str(d2 / "new.out")], timeout=5,
                 stop_when_p_gone=True)
        direct.append(int((d2 / "new.out").read_text()) - r2.report["t_launch"])
    med = {k: statistics.median(v) / 1e6 for k, v in
           (("guard-internal", internal), ("guarded", guarded), ("direct", direct))}
    print(f"\nguard cost (ms, median of 12): {med}, "
          f"extra vs direct exec: {med['guarded'] - med['direct']:.3f} ms")
    assert med["guard-internal"] < 5


# ---------------------------------------------------------------- the agent's death


def _agent_cmd(guard: Path, tmp: Path, agent: tuple[int, int], timeout: float,
               new_act: str = "sleep") -> list[str]:
    return guardmod.guard_command(guard, status=tmp / "status.json", commit=tmp / "commit.fifo",
                                  old_argv=standin(tmp, "old", "exit7"),
                                  new_argv=standin(tmp, "new", new_act),
                                  commit_timeout=timeout, log=tmp / "guard.log", agent=agent)


def test_agent_gone_before_the_guard_starts_falls_back_in_place(guard: Path,
                                                                 tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    r = run(guard, tmp_path, cmd=_agent_cmd(guard, tmp_path, (dead.pid, 1), 30))
    st = r.status
    assert st is not None and st["phase"] == "rolled-back" and st["reason"] == "agent-gone"
    assert st["qemu_pid"] == r.p and st["new_execed"] is False
    assert r.new == [] and [o["pid"] for o in r.old] == [r.p]


def test_an_agent_with_another_start_time_is_not_the_agent(guard: Path,
                                                           tmp_path: Path) -> None:
    """A reused pid: alive, but not the process the agent was."""
    me = os.getpid()
    r = run(guard, tmp_path, cmd=_agent_cmd(guard, tmp_path, (me, procfs.start_time(me) + 1),
                                            30))
    assert r.status is not None and r.status["reason"] == "agent-gone"


def test_agent_dies_before_the_commit_rolls_back_at_once(guard: Path, tmp_path: Path) -> None:
    agent = subprocess.Popen(["sleep", "3600"])
    killed: list[int] = []

    def kill_agent(r: Run) -> None:
        deadline = time.monotonic() + 10
        while not (tmp_path / "new.out").exists():
            assert time.monotonic() < deadline, "the new program never started"
            time.sleep(0.005)
        killed.append(time.time_ns())
        agent.kill()
        agent.wait()

    try:
        r = run(guard, tmp_path, during=kill_agent, timeout=60,
                cmd=_agent_cmd(guard, tmp_path, (agent.pid, procfs.start_time(agent.pid)), 60))
    finally:
        agent.kill()
        agent.wait()
    st = r.status
    assert st is not None and st["phase"] == "rolled-back" and st["reason"] == "agent-gone", st
    assert st["t_agent_gone_ns"] >= killed[0]
    # At once, not after the 60 s commit timeout.
    assert st["t_rollback_ns"] - killed[0] < 5e9
    [old] = r.old
    assert old["pid"] == st["watcher_pid"] and old["state_offset"] == 0
    assert_clean(r)


def test_keeper_refuses_an_incomplete_command_line(guard: Path, tmp_path: Path) -> None:
    res = subprocess.run([str(guard), "--keep", "--status", str(tmp_path / "k.status")],
                         capture_output=True, text=True, timeout=10, check=False)
    assert res.returncode == 2
    assert "--keep needs --status, --commit, --vm-qmp, --workdir" in res.stderr


def test_keeper_without_its_old_qemu_says_so(guard: Path, tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = os.getpid()
    cmd = guardmod.keeper_command(guard, status=tmp_path / "k.status", fifo=tmp_path / "k.fifo",
                                  agent=(me, procfs.start_time(me)), old=(dead.pid, 0),
                                  vm_qmp=str(tmp_path / "vm.sock"), workdir=str(tmp_path))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    assert res.returncode == 2
    st = guardmod.read_status(tmp_path / "k.status")
    assert st is not None and st["phase"] == guardmod.KEEPER_FAILED
    assert st["action"] == "no-old-qemu" and "is gone" in st["error"]


def test_keeper_exits_when_told_done(guard: Path, tmp_path: Path) -> None:
    old = subprocess.Popen(["sleep", "3600"])
    me = os.getpid()
    status = tmp_path / "k.status"
    cmd = guardmod.keeper_command(guard, status=status, fifo=tmp_path / "k.fifo",
                                  agent=(me, procfs.start_time(me)),
                                  old=(old.pid, procfs.start_time(old.pid)),
                                  vm_qmp=str(tmp_path / "vm.sock"), workdir=str(tmp_path))
    keeper = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        guardmod.wait_status(status, frozenset({guardmod.KEEPER_WATCHING}), timeout=10)
        guardmod.send(tmp_path / "k.fifo", "done")
        assert keeper.wait(10) == 0
        st = guardmod.read_status(status)
        assert st is not None and st["phase"] == guardmod.KEEPER_DONE
        assert not (tmp_path / "k.fifo").exists()
        assert old.poll() is None  # the old QEMU is none of its business then
    finally:
        keeper.kill()
        keeper.wait()
        old.kill()
        old.wait()


class FakeQmp:
    """A QMP monitor that answers like a paused QEMU after a load, and records commands."""

    def __init__(self, path: Path, runstate: str = "paused") -> None:
        import socket
        import threading

        self.path, self.runstate = path, runstate
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn, conn.makefile("rw") as f:
                f.write('{"QMP": {"version": {}, "capabilities": []}}\r\n')
                f.flush()
                for line in f:
                    cmd = json.loads(line)["execute"]
                    self.commands.append(cmd)
                    answer: dict[str, Any] = {}
                    if cmd == "query-status":
                        answer = {"status": self.runstate, "running": False}
                    elif cmd == "query-migrate":
                        answer = {"status": "completed"}
                    elif cmd == "cont":
                        self.runstate = "running"
                        f.write('{"timestamp": {"seconds": 1, "microseconds": 2}, '
                                '"event": "RESUME"}\r\n')
                    f.write(json.dumps({"return": answer}) + "\r\n")
                    f.flush()

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sock.close()


def test_agent_dies_after_the_commit_the_watcher_resumes_the_guest(guard: Path,
                                                                   tmp_path: Path) -> None:
    agent = subprocess.Popen(["sleep", "3600"])
    qmp = FakeQmp(tmp_path / "qmp.sock")
    cmd = guardmod.guard_command(guard, status=tmp_path / "status.json",
                                 commit=tmp_path / "commit.fifo",
                                 old_argv=standin(tmp_path, "old", "exit7"),
                                 new_argv=standin(tmp_path, "new", "sleep"), commit_timeout=30,
                                 log=tmp_path / "guard.log",
                                 agent=(agent.pid, procfs.start_time(agent.pid)),
                                 qmp=str(tmp_path / "qmp.sock"))

    def die_after_the_commit(r: Run) -> None:  # the harness commits
        guardmod.wait_status(tmp_path / "status.json", frozenset({"committed"}), timeout=10)
        agent.kill()
        agent.wait()

    try:
        r = run(guard, tmp_path, cmd=cmd, during=die_after_the_commit, action="commit",
                timeout=30)
    finally:
        agent.kill()
        agent.wait()
        qmp.close()
    st = r.status
    assert st is not None and st["phase"] == "committed", st
    assert st["reason"] == "resumed-by-watcher" and st["t_resumed_ns"] >= st["t_agent_gone_ns"]
    assert qmp.commands[-1] == "cont" and qmp.runstate == "running"
    assert r.old == []  # committed: never rolled back
    assert not r.fifo.exists()


def test_after_the_commit_resumed_lets_the_watcher_go(guard: Path, tmp_path: Path) -> None:
    agent = subprocess.Popen(["sleep", "3600"])
    qmp = FakeQmp(tmp_path / "qmp.sock")
    cmd = guardmod.guard_command(guard, status=tmp_path / "status.json",
                                 commit=tmp_path / "commit.fifo",
                                 old_argv=standin(tmp_path, "old", "exit7"),
                                 new_argv=standin(tmp_path, "new", "sleep"), commit_timeout=30,
                                 agent=(agent.pid, procfs.start_time(agent.pid)),
                                 qmp=str(tmp_path / "qmp.sock"))

    def resumed_after_the_commit(r: Run) -> None:  # the harness commits
        guardmod.wait_status(tmp_path / "status.json", frozenset({"committed"}), timeout=10)
        guardmod.send(tmp_path / "commit.fifo", "resumed")
        deadline = time.monotonic() + 10
        while (tmp_path / "commit.fifo").exists():  # the watcher unlinks it as it leaves
            assert time.monotonic() < deadline, "the watcher stayed"
            time.sleep(0.005)
        agent.kill()
        agent.wait()

    try:
        r = run(guard, tmp_path, cmd=cmd, during=resumed_after_the_commit, action="commit",
                timeout=30)
    finally:
        agent.kill()
        agent.wait()
        qmp.close()
    st = r.status
    assert st is not None and st["phase"] == "committed" and st["reason"] == "commit", st
    assert qmp.commands == []  # the agent resumed the guest; the watcher touched nothing
