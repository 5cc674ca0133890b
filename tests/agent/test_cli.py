"""`vmupdate-agent` as a person on a host uses it: inventory, preflight, update."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from e2e.rig import Rig
from e2e.rig.fixtures import VMFactory

pytestmark = pytest.mark.qemu

CLI = [sys.executable, "-m", "vmupdate_agent.cli"]


async def run_cli(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def common(rig: Rig, runtime_dir: Path, glob: str) -> list[str]:
    return ["--socket-glob", glob, "--allowed-dir", str(Path(rig.share) / "bin"),
            "--runtime-dir", str(runtime_dir)]


async def test_inventory_preflight_update(rig: Rig, vm_factory: VMFactory,
                                          runtime_dir: Path) -> None:
    vm = await vm_factory("sid", name="cli-vm")
    await vm.wait_ticking(90)
    opts = common(rig, runtime_dir, str(vm.workdir.parent / "cli-vm-*" / "qmp.sock"))

    rc, out, err = await run_cli(*opts, "inventory")
    assert rc == 0, err
    assert "cli-vm" in out and "cpr-exec,cpr-transfer" in out and "ready" in out

    rc, out, err = await run_cli(*opts, "--json", "inventory")
    rows = json.loads(out)
    assert rows[0]["vm"]["name"] == "cli-vm" and rows[0]["readiness"]["ready"] is True

    sid = str(rig.qemu("sid").wrapper)
    rc, out, err = await run_cli(*opts, "preflight", "cli-vm", "--binary", sid,
                                 "--version", "0.0.1")
    assert rc == 1
    assert "[FAIL] target-version" in out and "expected 0.0.1" in out

    # What Auto values, asked for on the command line: the preflight says what it would use.
    rc, out, err = await run_cli(*opts, "preflight", "cli-vm", "--binary", sid,
                                 "--prefer", "shortest-pause")
    assert rc == 0, out + err
    assert "Auto chose cpr-transfer: the shortest pause was preferred" in out
    rc, out, err = await run_cli(*opts, "preflight", "cli-vm", "--binary", sid)
    assert rc == 0 and "Auto chose cpr-exec" in out, out + err

    rc, out, err = await run_cli(*opts, "--json", "update", "cli-vm", "--binary", sid,
                                 "--version", rig.qemu("sid").version)
    assert rc == 0, out + err
    result = json.loads(out)
    assert result["outcome"] == "updated" and result["pid_after"] == result["pid_before"]
    assert result["pause_ms"] > 0
    vm.serial.assert_continuous()


async def test_bad_usage_is_a_clear_error(rig: Rig, runtime_dir: Path) -> None:
    opts = common(rig, runtime_dir, "/nonexistent/*.sock")
    rc, _, err = await run_cli(*opts, "update", "nosuchvm", "--binary", "relative/qemu")
    assert rc == 2
    assert "no VM named 'nosuchvm'" in err or "--binary must be an absolute path" in err
    rc, _, err = await run_cli(*opts, "update", "x", "--binary", "/q", "--prefer", "fastest")
    assert rc == 2 and "--prefer" in err and "shortest-pause" in err
    rc, _, err = await run_cli("--runtime-dir", "rel", "inventory")
    assert rc == 2 and "--runtime-dir must be absolute" in err
