"""The agent's fault points: named, checked, and a real SIGSTOP of the process once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from vmupdate_agent import faultpoints


def test_nothing_armed_by_default() -> None:
    assert faultpoints.armed_from({}) == set()
    assert faultpoints.armed_from({faultpoints.ENV: " "}) == set()


def test_known_points_are_armed() -> None:
    assert faultpoints.armed_from({faultpoints.ENV: "cpr-exec:committed"}) == {
        "cpr-exec:committed"}


def test_an_unknown_point_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"cpr-exec:comitted.*known: cpr-exec:committed"):
        faultpoints.armed_from({faultpoints.ENV: "cpr-exec:committed,cpr-exec:comitted"})


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_the_process_stops_at_an_armed_point_once() -> None:
    code = ("from vmupdate_agent import faultpoints as f\n"
            "f.reached('cpr-exec:committed')\n"
            "print('after the first', flush=True)\n"
            "f.reached('cpr-exec:committed')\n"
            "print('after the second', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, faultpoints.ENV: "cpr-exec:committed"})
    try:
        deadline = time.monotonic() + 30
        while _state(proc.pid) != "T":
            assert proc.poll() is None, "it ran past the point"
            assert time.monotonic() < deadline, "it never stopped"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.splitlines() == ["after the first", "after the second"]
    assert proc.returncode == 0


def test_an_unarmed_point_passes() -> None:
    code = ("from vmupdate_agent import faultpoints as f\n"
            "f.reached('cpr-exec:committed')\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != faultpoints.ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out.strip() == "ok"
