"""The new QEMU runs as the VM ran: a VM started as an unprivileged user (nobody, with a
supplementary group, no_new_privs, in a cgroup of its own) goes through cpr-transfer and
cpr-reboot on real QEMU, and its new QEMU has the same uid, gid, groups, no_new_privs and
cgroup; the target's probes ran as that user too (they succeed without root's rights)."""

from __future__ import annotations

import os
import secrets
import shlex
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from e2e.rig import Rig, TestVM
from e2e.rig.fixtures import VMFactory
from e2e.rig.serial import SerialMonitor
from e2e.rig.vm import _wait_started, build_argv, launch_detached
from tests.agent.conftest import make_engine
from vmupdate_agent import hostexec
from vmupdate_agent.models import Outcome, RequestedMode, Target

pytestmark = pytest.mark.qemu

NOBODY, NOGROUP, USERS = 65534, 65534, 100
CGROUP = Path("/sys/fs/cgroup/pids")


@pytest_asyncio.fixture
async def vm_cgroup(vm_factory: VMFactory) -> AsyncIterator[Path]:
    """A cgroup of its own for the VM (pids hierarchy); at teardown the VMs are stopped
    first (a cgroup with processes cannot be removed), then it is removed."""
    path = CGROUP / f"vmupdate-test-{secrets.token_hex(3)}"
    path.mkdir()
    yield path
    await vm_factory.close()
    path.rmdir()


async def start_unprivileged_vm(rig: Rig, factory: VMFactory, cgroup: Path, name: str
                                ) -> TestVM:
    """A backports VM (RAM in a /dev/shm file, for cpr-reboot too) started as nobody."""
    wd = rig.vms_dir / f"{name}-{secrets.token_hex(4)}"
    wd.mkdir(parents=True)
    os.chown(wd, NOBODY, NOGROUP)
    mem_path = Path("/dev/shm") / f"vmupdate-rig-{name}-{secrets.token_hex(6)}"
    vm_uuid = str(uuid.uuid4())
    argv = build_argv(rig, "backports", name=name, workdir=wd, vm_uuid=vm_uuid, mem_mib=256,
                      machine="pc-q35-10.0", backend="file", mem_path=mem_path)
    (wd / "cmdline").write_text(shlex.join(argv) + "\n")
    serial = SerialMonitor(wd / "serial.log").start()
    vm = factory.adopt(TestVM(rig=rig, flavour="backports", name=name, workdir=wd,
                              argv=argv, uuid=vm_uuid, mem_mib=256, machine="pc-q35-10.0",
                              backend="file", mem_path=mem_path, serial=serial))
    as_nobody = [*hostexec.cgroup_words([str(cgroup / "cgroup.procs")]), "setpriv",
                 f"--reuid={NOBODY}", f"--regid={NOGROUP}", f"--groups={USERS},{NOGROUP}",
                 "--nnp", "--"]
    await launch_detached([*as_nobody, *argv], cwd=wd, log_path=wd / "qemu.log")
    await _wait_started(vm, 30)
    await vm.wait_ticking(90)
    return vm


def identity(pid: int) -> tuple[hostexec.Credentials, str]:
    creds = hostexec.credentials_of(pid)
    [pids_cgroup] = [path for h, path in creds.cgroups if h.split(":", 1)[1] == "pids"]
    return creds, pids_cgroup


async def test_new_qemu_runs_as_the_vm_ran(rig: Rig, vm_factory: VMFactory, runtime_dir: Path,
                                           built_guard: Path, vm_cgroup: Path) -> None:
    vm = await start_unprivileged_vm(rig, vm_factory, vm_cgroup, "nobody-vm")
    before, cgroup = identity(vm.pid)
    assert (before.uid, before.gid, before.no_new_privs) == (NOBODY, NOGROUP, True)
    assert set(before.groups) == {USERS, NOGROUP}
    assert cgroup == "/" + vm_cgroup.name
    token = vm.token
    agent = make_engine(rig, runtime_dir, built_guard)
    for mode in (RequestedMode.CPR_TRANSFER, RequestedMode.CPR_REBOOT):
        old_pid = vm.pid
        result = await agent.update(str(vm.qmp_path), Target(
            binary=str(rig.qemu("backports").wrapper)), mode)
        assert result.outcome == Outcome.UPDATED, f"{mode}: {result.message}"
        await vm.serial.wait_ticks(5, after=time.monotonic_ns(), timeout=30)
        assert vm.pid == result.pid_after != old_pid
        after, after_cgroup = identity(vm.pid)
        assert (after.uid, after.gid, set(after.groups), after.no_new_privs) == (
            before.uid, before.gid, set(before.groups), True), f"{mode}: {after}"
        assert after_cgroup == cgroup, mode
    assert vm.token == token
    vm.serial.assert_continuous()


def test_credentials_parsing() -> None:
    status = ("Name:\tqemu\nUid:\t0\t65534\t65534\t65534\nGid:\t7\t100\t100\t100\n"
              "Groups:\t100 65534 \nNoNewPrivs:\t1\n")
    assert hostexec.parse_status(status) == (65534, 100, (100, 65534), True)
    assert hostexec.parse_cgroup("0::/machine.slice/vm1.scope\n4:memory:/a\n") == (
        ("0:", "/machine.slice/vm1.scope"), ("4:memory", "/a"))
    c = hostexec.Credentials(65534, 100, (100,), True)
    assert hostexec.privilege_words(c) == ["setpriv", "--reuid=65534", "--regid=100",
                                           "--groups=100", "--nnp", "--"]
    assert hostexec.privilege_words(hostexec.Credentials(0, 0, (0, 1))) == []
    assert hostexec.privilege_words(hostexec.Credentials(0, 0, (), True))[-2:] == ["--nnp", "--"]
    assert "--clear-groups" in hostexec.privilege_words(hostexec.Credentials(1000, 1000))


def test_a_vm_cgroup_outside_the_agents_namespace_is_refused(tmp_path: Path) -> None:
    vm = hostexec.Credentials(0, 0, cgroups=(("0:", "/../../machine.slice/vm1.scope"),))
    with pytest.raises(hostexec.HostExecError, match="outside the agent's cgroup namespace"):
        hostexec.cgroup_files(vm, hostexec.Credentials(0, 0, cgroups=(("0:", "/"),)),
                              str(tmp_path))
    (tmp_path / "cgroup.controllers").write_text("")
    (tmp_path / "vm1.scope").mkdir()
    (tmp_path / "vm1.scope" / "cgroup.procs").write_text("")
    vm = hostexec.Credentials(0, 0, cgroups=(("0:", "/vm1.scope"),))
    assert hostexec.cgroup_files(vm, hostexec.Credentials(0, 0, cgroups=(("0:", "/"),)),
                                 str(tmp_path)) == [str(tmp_path / "vm1.scope" / "cgroup.procs")]


async def test_probes_of_a_root_vm_run_as_nobody(rig: Rig, vm_factory: VMFactory,
                                                 runtime_dir: Path, built_guard: Path) -> None:
    """The target's -version and probe read nothing of the VM's: they run as nobody with
    no_new_privs. The dry run opens what the new QEMU will open, so it runs as the VM ran."""
    vm = await vm_factory("sid", name="probed")
    await vm.wait_ticking(90)
    bin_dir = runtime_dir / "opt-qemu"
    bin_dir.mkdir(mode=0o755)
    seen = runtime_dir / "seen"
    seen.mkdir()
    seen.chmod(0o777)  # the probes write here as nobody
    script = bin_dir / "qemu-system-x86_64"
    script.write_text(f'#!/bin/sh\necho "$(id -u) $(grep NoNewPrivs /proc/self/status | '
                      f'cut -f2) $1 $2" >> {seen}/calls\nexec {rig.qemu("sid").wrapper} "$@"\n')
    script.chmod(0o755)
    agent = make_engine(rig, runtime_dir, built_guard, allowed=(str(bin_dir),))
    report = await agent.preflight(str(vm.qmp_path), Target(binary=str(script)),
                                   RequestedMode.CPR_EXEC)
    assert report.passed, [c for c in report.checks if not c.passed]
    calls = [line.split(" ", 2) for line in (seen / "calls").read_text().splitlines()]
    probes = {args.strip(): (uid, nnp) for uid, nnp, args in calls
              if args.strip() in ("-version", "-machine none")}
    assert probes == {"-version": ("65534", "1"), "-machine none": ("65534", "1")}, calls
    dry = [c for c in calls if c[2].strip() not in probes]
    assert [(uid, nnp) for uid, nnp, _ in dry] == [("0", "0")], calls
    vm.serial.assert_continuous()
