"""The orphan reaper, on real processes.

Being a subreaper is a property of the whole process, and the test session already is one
(tests/conftest.py), so every scenario runs in a fresh Python process of its own that becomes
the subreaper, makes its orphans by double fork, and reports what happened as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

PRELUDE = textwrap.dedent("""
    import asyncio, ctypes, json, os, signal, sys, time
    from vmupdate_agent import procfs, reaper

    def orphan(code):
        '''A grandchild whose parent has exited (and was waited for): re-parented to us.
        It exits with `code` when told to (a byte on its pipe).'''
        r, w = os.pipe()
        pr, pw = os.pipe()
        mid = os.fork()
        if mid == 0:
            gc = os.fork()
            if gc == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(code)
            os.write(pw, str(gc).encode())
            os._exit(0)
        os.waitpid(mid, 0)
        gc = int(os.read(pr, 32))
        os.close(r)
        return gc, w

    def child(code, wait=False):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            if wait:
                os.read(r, 1)
            os._exit(code)
        os.close(r)
        return pid, w

    def until(pred, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.005)
        return False

    def zombie(pid):
        try:
            return procfs.stat_state(pid) == "Z"
        except FileNotFoundError:
            return False

    def gone(pid):
        return not os.path.exists(f"/proc/{pid}")

    out = {}
""")


def run(body: str) -> dict[str, Any]:
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_become_subreaper_adopts_orphans() -> None:
    out = run("""
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
        out["before"] = flag.value
        reaper.become_subreaper()
        libc.prctl(37, ctypes.byref(flag), 0, 0, 0)
        out["after"] = flag.value
        gc, w = orphan(0)
        out["parent_is_us"] = procfs.parent(gc) == os.getpid()
        os.write(w, b"x")
        os.waitpid(gc, 0)
    """)
    assert out == {"before": 0, "after": 1, "parent_is_us": True}


def test_reaps_an_adopted_orphan_after_the_grace_period_only() -> None:
    out = run("""
        reaper.become_subreaper()
        r = reaper.OrphanReaper(interval=0.01, grace=0.3)
        gc, w = orphan(7)
        os.write(w, b"x")
        out["zombie"] = until(lambda: zombie(gc))
        t0 = time.monotonic()
        out["first"] = r.reap_once()          # first sight: only noted
        out["still_zombie"] = zombie(gc)
        reaped = []
        until(lambda: reaped.extend(r.reap_once()) or bool(reaped))
        out["after_s"] = time.monotonic() - t0
        out["reaped"] = reaped
        out["gc"] = gc
        out["record"] = [[p, os.WEXITSTATUS(s)] for p, s in r.reaped]
        out["gone"] = gone(gc)
        out["again"] = r.reap_once()
    """)
    assert out["zombie"] and out["still_zombie"]
    assert out["first"] == []
    assert out["reaped"] == [out["gc"]]
    assert out["after_s"] >= 0.3
    assert out["record"] == [[out["gc"], 7]]
    assert out["gone"]
    assert out["again"] == []


def test_leaves_owned_and_living_children_alone() -> None:
    out = run("""
        reaper.become_subreaper()
        r = reaper.OrphanReaper(interval=0.01, grace=0.05)
        mine, _ = child(3)                    # waited for elsewhere (an asyncio subprocess)
        r.own(mine)
        alive, wa = child(0, wait=True)       # still running
        gc, w = orphan(5)
        os.write(w, b"x")
        until(lambda: zombie(mine) and zombie(gc))
        reaped = []
        until(lambda: reaped.extend(r.reap_once()) or bool(reaped))
        time.sleep(0.2)
        reaped += r.reap_once()
        out["reaped"] = reaped
        out["gc"] = gc
        out["mine_zombie"] = zombie(mine)
        out["mine_status"] = os.WEXITSTATUS(os.waitpid(mine, 0)[1])  # its status is intact
        out["alive_state"] = procfs.stat_state(alive)
        os.write(wa, b"x")
        os.waitpid(alive, 0)
    """)
    assert out["reaped"] == [out["gc"]]
    assert out["mine_zombie"]
    assert out["mine_status"] == 3
    assert out["alive_state"] in ("S", "R")


def test_disowned_child_is_reaped_like_an_orphan() -> None:
    out = run("""
        reaper.become_subreaper()
        r = reaper.OrphanReaper(interval=0.01, grace=0.05)
        pid, _ = child(9)
        r.own(pid)
        until(lambda: zombie(pid))
        time.sleep(0.1)
        out["while_owned"] = r.reap_once()
        r.disown(pid)
        r.disown(pid)                         # twice is fine
        reaped = []
        until(lambda: reaped.extend(r.reap_once()) or bool(reaped))
        out["reaped"] = reaped
        out["pid"] = pid
        out["status"] = [os.WEXITSTATUS(s) for _, s in r.reaped]
    """)
    assert out["while_owned"] == []
    assert out["reaped"] == [out["pid"]]
    assert out["status"] == [9]


@pytest.mark.parametrize("runner", ["thread", "asyncio"])
def test_background_runners_reap(runner: str) -> None:
    out = run(f"""
        reaper.become_subreaper()
        r = reaper.OrphanReaper(interval=0.01, grace=0.05)
        gcs = []
        for code in (11, 12):
            gc, w = orphan(code)
            os.write(w, b"x")
            gcs.append(gc)
        if {runner!r} == "thread":
            stop = r.start_thread()
            out["reaped_all"] = until(lambda: len(r.reaped) == 2)
            stop.set()
        else:
            async def main():
                task = asyncio.create_task(r.run())
                end = time.monotonic() + 5
                while len(r.reaped) < 2 and time.monotonic() < end:
                    await asyncio.sleep(0.01)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            asyncio.run(main())
            out["reaped_all"] = len(r.reaped) == 2
        out["statuses"] = sorted(os.WEXITSTATUS(s) for _, s in r.reaped)
        out["pids"] = sorted(p for p, _ in r.reaped) == sorted(gcs)
        out["left"] = [p for p in gcs if not gone(p)]
    """)
    assert out == {"reaped_all": True, "statuses": [11, 12], "pids": True, "left": []}


def test_without_children_nothing_happens() -> None:
    out = run("""
        r = reaper.OrphanReaper()
        out["none"] = r.reap_once()
        out["record"] = r.reaped
    """)
    assert out == {"none": [], "record": []}
