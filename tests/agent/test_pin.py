"""The pin on real QEMU: what was verified is what runs. The engine opens the target once,
hashes that open file while copying it privately, and runs only the copy, so a file swapped
at the target's path after the check never runs, and the sha256 holds when preflight is
skipped. The VM is still reported as running the target's path."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from e2e.rig import Rig
from e2e.rig.config import Flavour
from e2e.rig.fixtures import VMFactory
from tests.agent.conftest import make_engine
from vmupdate_agent import discovery, pathpolicy, procfs
from vmupdate_agent.models import Outcome, Phase, ProgressEvent, RequestedMode, Target

pytestmark = pytest.mark.qemu


def install_copy(rig: Rig, flavour: Flavour, bin_dir: Path) -> Path:
    """A copy of the flavour's real QEMU binary in an allowed directory the VM's root sees."""
    qemu = rig.qemu(flavour)
    bin_dir.mkdir(mode=0o755)
    path = bin_dir / "qemu-system-x86_64"
    shutil.copyfile(qemu.root / qemu.binary.lstrip("/") if qemu.root else Path(qemu.binary),
                    path)
    path.chmod(0o755)
    return path


def swap_in_impostor(path: Path, real: str, marker: Path) -> None:
    """Replace the file at `path` (a rename, as an attacker or a package manager would)."""
    impostor = path.with_name("impostor")
    impostor.write_text(f"#!/bin/sh\ntouch {marker}\nexec {real} \"$@\"\n")
    impostor.chmod(0o755)
    impostor.replace(path)


@pytest.mark.parametrize(("flavour", "mode"), [("sid", "cpr-exec"),
                                               ("backports", "cpr-transfer")])
async def test_a_target_swapped_after_the_check_never_runs(
        flavour: Flavour, mode: str, rig: Rig, vm_factory: VMFactory, runtime_dir: Path,
        built_guard: Path) -> None:
    bin_dir = runtime_dir / "opt-qemu"
    path = install_copy(rig, flavour, bin_dir)
    marker = runtime_dir / "impostor-ran"
    agent = make_engine(rig, runtime_dir, built_guard, allowed=(str(bin_dir),))
    vm = await vm_factory(flavour, name=f"pin-{flavour}",
                          backend="memfd" if mode == "cpr-exec" else "file")
    await vm.wait_ticking(90)
    token = vm.token

    def on_event(event: ProgressEvent) -> None:
        # After every check passed, before the new QEMU starts: swap the file.
        if event.phase == Phase.PREFLIGHT:
            swap_in_impostor(path, rig.qemu(flavour).binary, marker)

    result = await agent.update(str(vm.qmp_path), Target(binary=str(path)),
                                RequestedMode(mode), progress=on_event)
    assert result.outcome == Outcome.UPDATED, result.message
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    assert not marker.exists(), "the file swapped in after the check was run"
    assert "#!/bin/sh" in path.read_text(errors="replace")  # the swap did happen
    # The VM runs the verified private copy, and is reported as running the target's path.
    exe = procfs.exe(vm.pid)
    assert f"/{pathpolicy.PIN_DIR}/" in exe, exe
    info, _ = await discovery.discover(str(vm.qmp_path))
    assert info.binary == str(path)
    assert vm.token == token
    vm.serial.assert_continuous()


async def test_the_sha256_pin_holds_when_preflight_is_skipped(
        rig: Rig, vm_factory: VMFactory, runtime_dir: Path, built_guard: Path) -> None:
    bin_dir = runtime_dir / "opt-qemu"
    path = install_copy(rig, "sid", bin_dir)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    marker = runtime_dir / "impostor-ran"
    agent = make_engine(rig, runtime_dir, built_guard, allowed=(str(bin_dir),))
    vm = await vm_factory("sid", name="pin-sha")
    await vm.wait_ticking(90)
    pid = vm.pid
    swap_in_impostor(path, rig.qemu("sid").binary, marker)
    since = time.monotonic_ns()
    result = await agent.update(str(vm.qmp_path), Target(binary=str(path), sha256=digest),
                                RequestedMode.CPR_EXEC, skip_preflight=True)
    assert result.outcome == Outcome.FAILED, result.message
    assert f"target.sha256: {path} has sha256" in result.message
    assert "nothing was changed" in result.message
    assert not marker.exists()
    assert vm.pid == pid
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
    vm.serial.assert_continuous()
    assert vm.serial.max_gap_ms(since=since) < 200
