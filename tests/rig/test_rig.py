"""The rig itself: every QEMU build boots the guest, it ticks, and stop leaves nothing behind."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from e2e.rig import Flavour, Rig, load_rig, pid_alive, proc_state, zombies
from e2e.rig.fixtures import VMFactory
from e2e.rig.vm import Backend

pytestmark = pytest.mark.qemu


def test_rig_json_is_complete(rig: Rig) -> None:
    assert rig.backports.version_tuple[:2] >= (10, 0)
    assert rig.sid.version_tuple[:2] >= (10, 2)
    assert rig.trixie.version_tuple[:2] == (10, 0)
    assert rig.trixie_backports.version == rig.sid.version
    assert load_rig() == rig


def test_the_builds_are_genuinely_different(rig: Rig) -> None:
    """Four builds, four files: not links to one binary (the sid alt path is the exception,
    and is not one of them)."""
    builds = [rig.backports, rig.sid, rig.trixie, rig.trixie_backports]
    assert len({q.sha256 for q in builds}) == 4
    assert len({q.package_version for q in builds}) == 4
    assert rig.trixie.version != rig.backports.version  # 10.0.13 vs 10.0.2
    for q in builds:
        path = q.root / q.binary.lstrip("/") if q.root and not q.binary.startswith(
            str(rig.share)) else Path(q.binary)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == q.sha256, q


@pytest.mark.parametrize("flavour", ["backports", "sid", "trixie", "trixie-backports"])
def test_every_build_lists_its_types(rig: Rig, flavour: Flavour) -> None:
    """What the agent's target probe asks (qom-list-types loads every loadable module): a
    build that finds another build's modules aborts instead of answering."""
    q = rig.qemu(flavour)
    script = "".join(json.dumps({"execute": c}) + "\n"
                     for c in ("qmp_capabilities", "qom-list-types", "quit"))
    res = subprocess.run([str(q.wrapper), "-machine", "none", "-nodefaults", "-display", "none",
                          "-qmp", "stdio"], input=script, capture_output=True, text=True,
                         timeout=60, check=False)
    replies = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    types = [r["return"] for r in replies if isinstance(r.get("return"), list)]
    assert res.returncode == 0 and types and len(types[0]) > 100, (res.returncode, res.stderr)


@pytest.mark.parametrize("flavour", ["backports", "sid", "trixie", "trixie-backports"])
@pytest.mark.parametrize("backend", ["memfd", "file"])
async def test_vm_ticks_and_stops_clean(
    vm_factory: VMFactory, flavour: Flavour, backend: Backend
) -> None:
    t0 = time.monotonic()
    vm = await vm_factory(flavour, name=f"rig-{flavour}-{backend}", backend=backend)
    pid = vm.pid
    # detached: own session, not our child
    st = proc_state(pid)
    assert st is not None, "QEMU pid vanished"
    # Not spawned as our child.  It is re-parented to us only if this process is a child
    # subreaper (as the agent is in production, and a conftest may make the test process).
    assert st[1] != os.getpid() or is_subreaper(), "QEMU must not be a child of the test"
    assert os.getsid(pid) == pid, "QEMU must lead its own session"
    exe = os.readlink(f"/proc/{pid}/exe")
    if flavour == "sid":
        assert rig_root(vm.rig) in exe
    elif flavour == "backports":
        assert exe == "/usr/bin/qemu-system-x86_64"
    else:  # unpacked in the share, which the sid root mounts at the same path
        assert exe == rig_root(vm.rig) + vm.rig.qemu(flavour).binary

    token = await vm.wait_ticking(timeout=90)
    boot_s = time.monotonic() - t0
    print(f"{flavour}/{backend}: first tick {boot_s:.1f}s after start, pid {pid}, exe {exe}")
    assert await vm.query_status() == "running"
    if backend == "file":
        assert vm.mem_path is not None and vm.mem_path.exists()

    mark = time.monotonic_ns()
    await vm.serial.wait_ticks(100, after=mark, timeout=30)
    assert vm.token == token
    vm.serial.assert_continuous()
    gap = vm.serial.max_gap_ms(since=mark)
    assert gap < 1000, f"unexpected {gap:.0f} ms pause of an idle VM"
    assert vm.pid == pid

    await vm.stop()
    assert not pid_alive(pid)
    assert proc_state(pid) is None, "QEMU still present (zombie?) after stop"
    assert not [z for z in zombies() if z[0] == pid or "qemu" in z[2]]
    if vm.mem_path is not None:
        assert not vm.mem_path.exists()
    # a stopped VM's log stops growing
    n = len(vm.serial.ticks)
    await asyncio.sleep(0.1)
    assert len(vm.serial.ticks) == n


def is_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    return flag.value != 0


def rig_root(rig: Rig) -> str:
    assert rig.sid.root is not None
    return str(rig.sid.root)
