"""Plays "QEMU at the moment of cpr-exec" for the guard tests; run as a script.

It makes itself a child subreaper (so the guard's watcher is reparented to it and can be
reaped and inspected), prepares fds like QEMU hands over (CPR state memfd with its offset
at the end, a RAM memfd at a high fd number, a pipe), execs the guard command as process P,
optionally commits/aborts, reaps every descendant, and prints a JSON report.

Usage: _harness.py SPEC_JSON   (see run() in test_guard_unit.py for the keys)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36
STATE = b"QEMU-CPR-STATE:" + bytes(range(256)) * 16


def children_of(pid: int) -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2 :].split()
        if int(rest[1]) == pid:
            out.append((int(d), rest[0]))
    return out


def wait_file(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return True
        time.sleep(0.005)
    return False


def exec_from_thread(argv: list[str], env: dict[str, str]) -> None:
    """Exec from a thread other than the main one, with every signal blocked, as QEMU does
    when a thread of its own (they all block every signal) runs the cpr-exec bottom half."""

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
        os.execve(argv[0], argv, env)

    t = threading.Thread(target=run)
    t.start()
    t.join()  # returns only if the exec failed


def main() -> None:
    spec = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

    state = os.memfd_create("QEMU_CPR_EXEC_STATE", 0)
    os.write(state, STATE)  # offset now at the end, as after QEMU wrote the state
    ram = os.memfd_create("ram0", 0)
    os.ftruncate(ram, 1 << 20)
    ram_hi = os.dup2(ram, 100)
    os.close(ram)
    prd, pwr = os.pipe()
    pass_fds = [state, ram_hi, prd]
    os.set_inheritable(pwr, False)

    env = {"PATH": "/usr/bin:/bin", "VMUPDATE_TEST": "x y\tz", "LC_ALL": "C"}
    if not spec.get("no_state_env"):
        env["QEMU_CPR_EXEC_STATE"] = str(state)
    env.update(spec.get("env", {}))

    out_fd = os.open(spec["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err_fd = os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    report: dict = {
        "harness_pid": os.getpid(),
        "passed_fds": sorted([0, 1, 2, *pass_fds]),
        "fd_ids": {str(fd): [os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in pass_fds},
        "env": env,
        "p_children": None,
    }
    report["t_launch"] = time.time_ns()
    p = os.fork()
    if p == 0:  # becomes P: "QEMU" exec'ing its cpr-exec-command
        try:
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            keep = {0, 1, 2, *pass_fds}
            for fd in range(3, 256):
                if fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            for fd in pass_fds:
                os.set_inheritable(fd, True)
            if spec.get("ignore_sigchld"):
                signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            if spec.get("exec_from_thread"):
                exec_from_thread(spec["argv"], env)
            os.execve(spec["argv"][0], spec["argv"], env)
        finally:
            os._exit(127)
    report["p_pid"] = p

    action = spec.get("action")
    if action in ("commit", "abort", "watch"):
        if not wait_file(spec["new_out"], 10):
            report["error"] = "new never started"
        else:
            time.sleep(spec.get("settle", 0.05))
            report["p_children"] = children_of(p)
            if action != "watch":
                with open(spec["fifo"], "w") as f:
                    f.write(action + "\n")

    reap_delay = spec.get("reap_delay", 0)
    deadline = time.monotonic() + spec.get("timeout", 20)
    reaped: dict[str, int] = {}
    # "job_control": P's stops and continues are recorded too (the watcher stops P before it
    # decides on a rollback).
    job_control = os.WUNTRACED | os.WCONTINUED if spec.get("job_control") else 0
    job: list[list[object]] = []
    while time.monotonic() < deadline:
        if str(p) not in reaped and action == "commit" and reaped:
            # the watcher exited (committed); the new-QEMU stand-in still sleeps in P
            report["p_children_after_commit"] = children_of(p)
            report["p_alive_after_commit"] = True
            os.kill(p, signal.SIGKILL)
            action = None
        if reap_delay:
            # keep P a zombie for a while (the watcher then finds its exit code in /proc)
            r = os.waitid(os.P_PID, p, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if r is not None:
                time.sleep(reap_delay)
                reap_delay = 0
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | job_control)
        except ChildProcessError:
            break
        if pid and (os.WIFSTOPPED(status) or os.WIFCONTINUED(status)):
            job.append([pid, "stopped" if os.WIFSTOPPED(status) else "continued"])
            continue
        if pid:
            reaped[str(pid)] = os.waitstatus_to_exitcode(status)
            continue
        if spec.get("stop_when_p_gone") and str(p) in reaped:
            break
        time.sleep(0.002)
    report["p_status"] = reaped.get(str(p))
    report["reaped"] = reaped
    report["job"] = job
    report["left"] = children_of(os.getpid())
    for pid, _ in report["left"]:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    report["state_offset_end"] = os.lseek(state, 0, os.SEEK_CUR)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
