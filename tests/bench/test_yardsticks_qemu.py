"""The pause benchmark's yardsticks on real QEMU: a plain live migration keeps the guest and
moves the VM (process, socket, RAM file) to the new QEMU; the floor's QEMU leaves nothing
behind and never touches the running VM."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import plain
from e2e.rig import Rig
from e2e.rig.fixtures import VMFactory
from e2e.rig.vm import pid_alive

pytestmark = pytest.mark.qemu


def bench_ram_files() -> set[Path]:
    return set(Path("/dev/shm").glob("vmupdate-bench-*"))


async def test_plain_migration_moves_the_vm_and_keeps_the_guest(rig: Rig,
                                                                 vm_factory: VMFactory) -> None:
    vm = await vm_factory("sid", backend="file")
    token = await vm.wait_ticking(120)
    binary = str(rig.qemu("sid").wrapper)
    for i in range(2):  # the second one starts from the process the first one made
        old_pid, old_ram = vm.pid, vm.mem_path
        assert old_ram is not None
        workdir = vm.workdir / f"plain{i}"
        workdir.mkdir()
        issued, stop, resume = await plain.plain_migration(vm, binary, workdir)
        assert issued <= stop < resume
        assert vm.pid != old_pid and not pid_alive(old_pid)
        assert vm.mem_path is not None and vm.mem_path != old_ram
        assert vm.mem_path.exists() and not old_ram.exists()
        assert f"mem-path={vm.mem_path}," in " ".join(vm.args)
        assert await vm.query_status() == "running"
        await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=60)
    assert vm.token == token
    vm.serial.assert_continuous()


async def test_the_floor_starts_and_reaps_its_own_qemu_beside_the_vm(
        rig: Rig, vm_factory: VMFactory) -> None:
    vm = await vm_factory("sid", backend="file")
    token = await vm.wait_ticking(120)
    before = bench_ram_files()
    ms = await plain.startup_floor(vm, str(rig.qemu("sid").wrapper), vm.workdir / "floor")
    assert ms > 0
    assert not (vm.workdir / "floor" / "floor.sock").exists()
    assert bench_ram_files() == before
    assert vm.mem_path is not None and vm.mem_path.exists()
    await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=60)
    assert vm.token == token and await vm.query_status() == "running"
    vm.serial.assert_continuous()


async def test_the_floor_fails_loudly_when_no_qemu_answers(vm_factory: VMFactory) -> None:
    vm = await vm_factory("sid")
    with pytest.raises(TimeoutError, match="no QMP"):
        await plain.startup_floor(vm, "/bin/false", vm.workdir / "floor", timeout=3)
    assert await vm.query_status() == "running"
