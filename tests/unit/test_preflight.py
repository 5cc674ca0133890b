"""Preflight: mode choice, every named check (failing with its message, and passing), the
report, and the inventory's readiness, on VMs built from recorded discovery answers."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from vmupdate_agent import discovery, preflight
from vmupdate_agent.models import (
    CprMode,
    MemoryBackend,
    Preference,
    QemuFeatures,
    QemuVersion,
    RequestedMode,
    TapDevice,
    Target,
    VMInfo,
)
from vmupdate_agent.preflight import HostFacts, PreflightInputs
from vmupdate_agent.target import BinaryFacts, DryRunFacts, ProbeFacts

EXEC, TRANSFER, REBOOT = CprMode.CPR_EXEC, CprMode.CPR_TRANSFER, CprMode.CPR_REBOOT
ALL_MODES = (REBOOT, TRANSFER, EXEC)
NO_EXEC = (REBOOT, TRANSFER)

V11 = QemuVersion(major=11, minor=1, micro=3, package="Debian 1:11.1.3+ds-1")
V10_2 = QemuVersion(major=10, minor=2, micro=0)
V10_1 = QemuVersion(major=10, minor=1, micro=0)
V10 = QemuVersion(major=10, minor=0, micro=2, package="Debian 1:10.0.2+ds-2+deb13u1~bpo12+1")
V9_2 = QemuVersion(major=9, minor=2, micro=0)
V9_1 = QemuVersion(major=9, minor=1, micro=0)
V7 = QemuVersion(major=7, minor=2, micro=0)

NEW = "/usr/lib/qemu-new/bin/qemu-system-x86_64"
ALLOWED = ("/usr/lib/qemu-new",)
GUARD = "/run/vmupdate/bin/vmupdate-cpr-guard"

Edit = Callable[[PreflightInputs], PreflightInputs]
VmLoader = Callable[[str], VMInfo]
BASE = "raw-sid-11.1.3-memfd"


def features(version: QemuVersion = V11, modes: tuple[CprMode, ...] = ALL_MODES, *,
             cmd: bool = True, legacy: bool = False) -> QemuFeatures:
    return QemuFeatures(version=version, cpr_modes=modes, has_cpr_exec_command=cmd,
                        legacy_cpr_dialect=legacy)


F11 = features()
F10 = features(V10, NO_EXEC, cmd=False)


def good_inputs(vm: VMInfo, requested: RequestedMode = RequestedMode.AUTO,
                new: QemuFeatures = F11) -> PreflightInputs:
    """Everything in order for this VM: each test breaks exactly one thing."""
    return PreflightInputs(
        vm=vm,
        target=Target(binary=NEW),
        requested=requested,
        host=HostFacts(allowed_dirs=ALLOWED, runtime_dir_free_bytes=1 << 30,
                       runtime_dir_shared=True, guard_path=GUARD),
        binary=BinaryFacts(path=NEW, exists=True, is_file=True, executable=True, real_path=NEW,
                           version_output=f"QEMU emulator version {new.version}",
                           version=new.version),
        probe=ProbeFacts(ok=True, features=new,
                         machine_types=frozenset({vm.machine_type, "pc-q35-11.1", "q35"}),
                         qom_types=frozenset({*vm.device_drivers, "virtio-net-pci"})),
        dry_run=DryRunFacts(ok=True, machine_type=vm.machine_type,
                            memdevs={b.id: b.size_bytes for b in vm.memory_backends}),
    )


# --- edits of the good inputs -----------------------------------------------------------------


def chain(*edits: Edit) -> Edit:
    def edit(p: PreflightInputs) -> PreflightInputs:
        for e in edits:
            p = e(p)
        return p
    return edit


def same(p: PreflightInputs) -> PreflightInputs:
    return p


def vm_(**update: Any) -> Edit:
    return lambda p: replace(p, vm=p.vm.model_copy(update=update))


def old_(f: QemuFeatures) -> Edit:
    return vm_(features=f)


def host_(**update: Any) -> Edit:
    return lambda p: replace(p, host=replace(p.host, **update))


def bin_(**update: Any) -> Edit:
    return lambda p: replace(p, binary=replace(p.binary, **update))


def target_(**update: Any) -> Edit:
    return lambda p: replace(p, target=p.target.model_copy(update=update))


def probe_(**update: Any) -> Edit:
    def edit(p: PreflightInputs) -> PreflightInputs:
        assert p.probe is not None
        return replace(p, probe=replace(p.probe, **update))
    return edit


def new_(f: QemuFeatures) -> Edit:
    return chain(probe_(features=f), bin_(version=f.version))


def dry_(**update: Any) -> Edit:
    def edit(p: PreflightInputs) -> PreflightInputs:
        assert p.dry_run is not None
        return replace(p, dry_run=replace(p.dry_run, **update))
    return edit


def inputs_(**update: Any) -> Edit:
    return lambda p: replace(p, **update)


NO_PROBE = inputs_(probe=None)
FAILED_PROBE = inputs_(probe=ProbeFacts(ok=False, error="`/x` did not start as QEMU: exited 1"))
MIB = 1 << 20

CHECKS = dict((*preflight.VM_CHECKS, *preflight.TARGET_CHECKS))


def run_check(name: str, p: PreflightInputs, mode: CprMode) -> str | None:
    assert name in CHECKS, f"no preflight check named {name!r}"
    return CHECKS[name](p, mode)


# --- every check fails with its message ------------------------------------------------------

C = pytest.param
FAILS = [
    # runstate
    C("runstate", EXEC, "runstate-inmigrate", same,
      ("the VM is 'inmigrate'", "CPR starts only from running or paused", "resume it first"),
      id="runstate-inmigrate"),
    C("runstate", TRANSFER, "runstate-postmigrate", same, ("'postmigrate'", "Wait for"),
      id="runstate-postmigrate"),
    C("runstate", EXEC, BASE, vm_(runstate="finish-migrate"), ("'finish-migrate'",),
      id="runstate-finish-migrate"),
    C("runstate", EXEC, BASE, vm_(runstate="shutdown"), ("'shutdown'",), id="runstate-shutdown"),
    C("runstate", EXEC, BASE, vm_(runstate="internal-error"), ("'internal-error'",),
      id="runstate-internal-error"),
    C("runstate", EXEC, BASE, vm_(runstate="unknown"), ("'unknown'",), id="runstate-unknown"),
    # migration-idle
    C("migration-idle", EXEC, BASE, vm_(migration_status="active"),
      ("already migrating this VM", "'active'", "migrate_cancel"), id="migration-active"),
    C("migration-idle", TRANSFER, BASE, vm_(migration_status="pre-switchover"),
      ("'pre-switchover'", "wait for that migration to end"), id="migration-pre-switchover"),
    C("migration-idle", REBOOT, BASE, vm_(migration_status="setup"), ("'setup'",),
      id="migration-setup"),
    # memory-shared
    C("memory-shared", EXEC, "memory-ram-share-off", same,
      ("memory backend ram0 is ram with share=off",
       "only in memory-backend-memfd or memory-backend-file with share=on"),
      id="memory-ram-share-off"),
    C("memory-shared", TRANSFER, BASE, vm_(memory_backends=()),
      ("guest RAM is not in a memory backend",
       "-machine memory-backend=ram0 -object memory-backend-memfd,id=ram0,size=...,share=on"),
      id="memory-no-backend"),
    C("memory-shared", EXEC, BASE,
      vm_(memory_backends=(MemoryBackend(id="ram0", kind="memfd", size_bytes=256 * MIB,
                                         share=False),)),
      ("memory backend ram0 is memfd with share=off",), id="memory-memfd-share-off"),
    C("memory-shared", TRANSFER, BASE,
      vm_(memory_backends=(MemoryBackend(id="m0", kind="other", size_bytes=MIB, share=True),
                           MemoryBackend(id="m1", kind="ram", size_bytes=MIB, share=False))),
      ("memory backend m0 is other with share=on", "; memory backend m1 is ram with share=off"),
      id="memory-every-bad-backend-named"),
    C("memory-shared", REBOOT, BASE, same,
      ("memory backend ram0 is a memfd, which dies with the QEMU process",
       "cpr-reboot needs memory-backend-file on /dev/shm (share=on)",
       "use cpr-exec or cpr-transfer for this VM"),
      id="memory-memfd-for-cpr-reboot"),
    # aux-ram-share
    C("aux-ram-share", EXEC, "aux-ram-share-off", same,
      ("-machine aux-ram-share=off", "which cpr-exec cannot do",
       "start QEMU with -machine ...,aux-ram-share=on"), id="aux-ram-share-off-exec"),
    C("aux-ram-share", TRANSFER, "aux-ram-share-off", same, ("which cpr-transfer cannot do",),
      id="aux-ram-share-off-transfer"),
    C("aux-ram-share", TRANSFER, "qemu-9.2.0-no-aux-ram-share", same,
      ("QEMU 9.2.0 has no aux-ram-share machine option", "cpr-transfer needs it (QEMU >= 10.0)"),
      id="aux-ram-share-absent"),
    # legacy-cpr-dialect
    C("legacy-cpr-dialect", EXEC, "legacy-dialect", same,
      ("the running QEMU 9.1.0 speaks the older out-of-tree CPR dialect",
       "-migrate-mode-enable, cpr-exec-args", "run an upstream QEMU >= 10.0"),
      id="legacy-dialect"),
    # mode-supported-by-running-qemu
    C("mode-supported-by-running-qemu", EXEC, "qemu-10.0.2", same,
      ("the running QEMU 10.0.2 does not support cpr-exec", "(it has: cpr-reboot, cpr-transfer)"),
      id="old-without-cpr-exec"),
    C("mode-supported-by-running-qemu", TRANSFER, "qemu-9.2.0-no-aux-ram-share", same,
      ("the running QEMU 9.2.0 does not support cpr-transfer (it has: cpr-reboot)",),
      id="old-without-cpr-transfer"),
    C("mode-supported-by-running-qemu", TRANSFER, BASE, old_(features(V7, ())),
      ("the running QEMU 7.2.0 does not support cpr-transfer (it has: no CPR mode)",),
      id="old-without-cpr"),
    C("mode-supported-by-running-qemu", EXEC, BASE, old_(features(cmd=False)),
      ("the running QEMU 11.1.3 lists cpr-exec but has no cpr-exec-command migration "
       "parameter",), id="old-without-cpr-exec-command"),
    # migration-blockers
    C("migration-blockers", EXEC, "migration-blocker-all-modes", same,
      ("QEMU blocks cpr-exec: Migration is disabled when VirtFS export path '/srv/share' is "
       "mounted in the guest using mount_tag 'share'",), id="blocker-virtfs"),
    C("migration-blockers", TRANSFER, "aux-ram-share-off", same,
      ("QEMU blocks cpr-transfer: ", "Memory region pc.bios is not compatible with CPR",
       "; Memory region pc.rom"), id="blocker-aux-ram-share-off"),
    # incompatible-capabilities
    C("incompatible-capabilities", EXEC, "capability-x-colo", same,
      ("migration capabilities x-colo are enabled and cannot be combined with CPR",
       "turn them off (migrate-set-capabilities) first"), id="capability-x-colo"),
    C("incompatible-capabilities", TRANSFER, "capability-postcopy-ram", same,
      ("capabilities postcopy-ram are enabled",), id="capability-postcopy-ram"),
    C("incompatible-capabilities", REBOOT, "capability-background-snapshot", same,
      ("capabilities background-snapshot are enabled",), id="capability-background-snapshot"),
    C("incompatible-capabilities", EXEC, BASE,
      vm_(enabled_capabilities=("events", "postcopy-preempt", "postcopy-ram")),
      ("capabilities postcopy-preempt, postcopy-ram are enabled",), id="capability-several"),
    # tap-by-fd
    C("tap-by-fd", EXEC, "tap-ifname", same,
      ("netdev net0 opens tap 'tap0' by name: after cpr-exec the new QEMU finds it busy",
       "Pass the tap as fd=N (an inherited descriptor) instead of ifname="), id="tap-name-exec"),
    C("tap-by-fd", TRANSFER, "tap-fd", same,
      ("netdevs net0 are taps: cpr-transfer cannot hand tap descriptors to the new QEMU",
       "use cpr-exec with fd=N"), id="tap-fd-transfer"),
    C("tap-by-fd", TRANSFER, "tap-ifname", same, ("netdevs net0 are taps",),
      id="tap-name-transfer"),
    C("tap-by-fd", EXEC, "tap-fd",
      vm_(taps=(TapDevice(id="net0", fd=23), TapDevice(id="net1", ifname="tap1"))),
      ("netdev net1 opens tap 'tap1' by name",), id="tap-one-of-two-by-name"),
    # vfio
    C("vfio", REBOOT, "vfio-pci", same,
      ("vfio-pci: cpr-reboot keeps vfio devices only for a guest suspended to RAM",
       "use cpr-transfer or cpr-exec"), id="vfio-reboot"),
    C("vfio", REBOOT, "vfio-pci-iommufd", same, ("vfio-pci, iommufd: cpr-reboot",),
      id="iommufd-reboot"),
    C("vfio", TRANSFER, "qemu-10.0.2-vfio-pci", new_(F10),
      ("vfio-pci: cpr-transfer preserves vfio/iommufd devices only from QEMU 10.1",
       "running QEMU 10.0.2 and target QEMU 10.0.2 is older"), id="vfio-transfer-10.0"),
    C("vfio", TRANSFER, "qemu-10.0.2-vfio-pci", same,
      ("only from QEMU 10.1; running QEMU 10.0.2 is older",), id="vfio-transfer-old-10.0"),
    C("vfio", TRANSFER, "vfio-pci", new_(F10),
      ("only from QEMU 10.1; target QEMU 10.0.2 is older",), id="vfio-transfer-target-10.0"),
    C("vfio", EXEC, "vfio-pci", old_(features(V10_1)),
      ("cpr-exec preserves vfio/iommufd devices only from QEMU 10.2",
       "running QEMU 10.1.0 is older"), id="vfio-exec-old-10.1"),
    C("vfio", EXEC, "vfio-pci-iommufd", chain(old_(features(V10_1)), new_(features(V10_1))),
      ("vfio-pci, iommufd: cpr-exec preserves", "running QEMU 10.1.0 and target QEMU 10.1.0"),
      id="iommufd-exec-10.1"),
    # vhost
    C("vhost", EXEC, "tap-fd-vhost-no-vhostfd", same,
      ("netdev net0 uses vhost=on without vhostfd=", "would reopen /dev/vhost-net",
       "pass the descriptor with vhostfd=N"), id="vhost-without-vhostfd-exec"),
    C("vhost", TRANSFER, "tap-fd-vhost-no-vhostfd", same, ("without vhostfd=",),
      id="vhost-without-vhostfd-transfer"),
    C("vhost", TRANSFER, "tap-fd-vhost-vhostfd", same,
      ("netdev net0: vhost descriptors cannot be handed over by cpr-transfer",),
      id="vhostfd-transfer"),
    C("vhost", REBOOT, "tap-fd-vhost-vhostfd", same,
      ("vhost descriptors cannot be handed over by cpr-reboot",), id="vhostfd-reboot"),
    C("vhost", EXEC, "vhost-user-net", same,
      ("netdev net0 (vhost-user): of the vhost-user devices only vhost-user-blk",),
      id="vhost-user-net"),
    # vhost-user-blk per mode and chardev: tests/unit/test_preflight_vhost.py
    # hotplugged-devices
    C("hotplugged-devices", EXEC, "hotplugged-device", host_(hotplugged=("disk1",)),
      ("devices disk1 were hot-plugged and are not on the command line", "unplug them first"),
      id="hotplugged"),
    # target-path
    C("target-path", EXEC, BASE, target_(binary="qemu-system-x86_64"),
      ("target binary 'qemu-system-x86_64' is not an absolute path",), id="target-relative"),
    C("target-path", EXEC, BASE, target_(binary="/usr/lib/qemu-new/../../bin/qemu"),
      ("contains '..': give the plain absolute path",), id="target-dotdot"),
    # target-extra-args (every refused option: tests/unit/test_extra_args.py)
    C("target-extra-args", EXEC, BASE, target_(extra_args=("-qmp", "tcp:0.0.0.0:4444")),
      ("target.extra_args[0]: '-qmp' is not an allowed option", "-msg <timestamp=on|off",
       "nothing was run with them"), id="extra-args-qmp"),
    # target-exists
    C("target-exists", EXEC, BASE, bin_(exists=False, is_file=False, executable=False),
      (f"target {NEW} does not exist in the VM's root; install the new QEMU there first",),
      id="target-missing"),
    C("target-exists", EXEC, BASE, bin_(is_file=False, executable=False),
      (f"target {NEW} is not a regular file",), id="target-not-a-file"),
    # target-executable
    C("target-executable", EXEC, BASE, bin_(executable=False),
      (f"target {NEW} is not executable (chmod +x, or fix the path)",), id="target-not-executable"),
    C("target-executable", EXEC, BASE, bin_(exists=False, is_file=False, executable=False),
      ("target does not exist",), id="target-executable-missing"),
    # target-allowed-directory
    C("target-allowed-directory", EXEC, BASE, host_(allowed_dirs=()),
      ("this host allows no target directories",
       "allowed_binary_dirs is empty in the agent's configuration"), id="allowed-none"),
    C("target-allowed-directory", EXEC, BASE,
      chain(target_(binary="/opt/other/qemu"), bin_(path="/opt/other/qemu",
                                                    real_path="/opt/other/qemu")),
      ("target.binary: /opt/other/qemu is outside the directories this host allows "
       "(/usr/lib/qemu-new)",
       "install it there or extend allowed_binary_dirs"), id="allowed-outside"),
    C("target-allowed-directory", EXEC, BASE, bin_(real_path="/tmp/evil/qemu"),
      ("resolves to /tmp/evil/qemu, outside the directories",), id="allowed-symlink-escapes"),
    C("target-allowed-directory", EXEC, BASE,
      chain(target_(binary="/usr/lib/qemu-new-evil/qemu"), bin_(real_path="")),
      ("target.binary: /usr/lib/qemu-new-evil/qemu is outside",), id="allowed-sibling-prefix"),
    # target-sha256
    C("target-sha256", EXEC, BASE, chain(target_(sha256="ab" * 32), bin_(sha256=None)),
      ("sha256 was requested but the target could not be read",), id="sha256-unreadable"),
    C("target-sha256", EXEC, BASE, chain(target_(sha256="AB" * 32), bin_(sha256="cd" * 32)),
      (f"has sha256 {'cd' * 32}, expected {'ab' * 32}",
       "the file on this host is not the build you meant"), id="sha256-mismatch"),
    # target-version
    C("target-version", EXEC, BASE, bin_(version=None, version_error="`x -version` exited 1: no"),
      ("`x -version` exited 1: no",), id="version-error"),
    C("target-version", EXEC, BASE, bin_(version=None), ("the target's version is unknown",),
      id="version-unknown"),
    C("target-version", EXEC, BASE, target_(expected_version="11.1.2"),
      (f"target {NEW} is QEMU 11.1.3 (Debian 1:11.1.3+ds-1), expected 11.1.2",),
      id="version-mismatch"),
    C("target-version", EXEC, BASE,
      chain(target_(expected_version="10.0.2"), bin_(version=QemuVersion(major=11, minor=1,
                                                                          micro=3))),
      ("is QEMU 11.1.3, expected 10.0.2",), id="version-mismatch-no-package"),
    # target-probe
    C("target-probe", EXEC, BASE, NO_PROBE, ("the target was not probed",), id="probe-missing"),
    C("target-probe", EXEC, BASE, FAILED_PROBE, ("`/x` did not start as QEMU: exited 1",),
      id="probe-failed"),
    # mode-supported-by-target
    C("mode-supported-by-target", EXEC, BASE, NO_PROBE,
      ("the target's CPR modes are unknown (probe failed)",), id="new-modes-unprobed"),
    C("mode-supported-by-target", EXEC, BASE, FAILED_PROBE, ("unknown (probe failed)",),
      id="new-modes-probe-failed"),
    C("mode-supported-by-target", EXEC, BASE, new_(features(V9_1, (EXEC,), legacy=True)),
      ("the target QEMU 9.1.0 speaks the older out-of-tree CPR dialect",
       "use an upstream QEMU >= 10.0"), id="new-legacy"),
    C("mode-supported-by-target", EXEC, BASE, new_(F10),
      ("the target QEMU 10.0.2 does not support cpr-exec (it has: cpr-reboot, cpr-transfer)",),
      id="new-without-cpr-exec"),
    C("mode-supported-by-target", TRANSFER, BASE, new_(features(V7, ())),
      ("(it has: no CPR mode)",), id="new-without-cpr"),
    # machine-type-known
    C("machine-type-known", EXEC, BASE, probe_(machine_types=frozenset({"pc-q35-11.1"})),
      ("the target QEMU does not know machine type 'pc-q35-10.0', which the VM runs",
       "choose a QEMU that still has it"), id="machine-unknown"),
    C("machine-type-known", EXEC, BASE, NO_PROBE, ("unknown: the target could not be probed",),
      id="machine-unprobed"),
    C("machine-type-known", EXEC, BASE, FAILED_PROBE, ("could not be probed",),
      id="machine-probe-failed"),
    # device-drivers-known
    C("device-drivers-known", EXEC, "vfio-pci", probe_(qom_types=frozenset({"virtio-net-pci"})),
      ("the target QEMU lacks device driver(s) the VM uses: vfio-pci",), id="driver-missing"),
    C("device-drivers-known", EXEC, "vfio-pci", FAILED_PROBE, ("could not be probed",),
      id="drivers-probe-failed"),
    # state-file-room
    C("state-file-room", EXEC, BASE, host_(runtime_dir_shared=False),
      ("the agent's runtime directory is not visible to QEMU at the same path",
       "mount it into the VM's root (or the QEMU container) at the same path"),
      id="runtime-dir-not-shared"),
    C("state-file-room", EXEC, BASE, host_(runtime_dir_free_bytes=10 * MIB),
      ("only 10 MiB free in the runtime directory",
       "the state file needs 64 MiB of headroom"), id="runtime-dir-full"),
    C("state-file-room", EXEC, BASE, host_(runtime_dir_free_bytes=64 * MIB - 1),
      ("only 63 MiB free",), id="runtime-dir-just-short"),
    # cpr-exec-guard
    C("cpr-exec-guard", EXEC, BASE, host_(guard_path=None),
      ("the cpr-exec guard is not installed where QEMU can exec it",
       "without it a failed exec would lose the VM"), id="guard-missing"),
    # dry-run
    C("dry-run", EXEC, BASE, inputs_(dry_run=None), ("the dry run did not run",),
      id="dry-run-missing"),
    C("dry-run", EXEC, BASE, dry_(ok=False, error="qemu: -foo: invalid option"),
      ("the new QEMU refused the VM's command line in a dry run: qemu: -foo: invalid option",
       "nothing was changed"), id="dry-run-refused"),
    C("dry-run", EXEC, BASE, dry_(machine_type="pc-q35-11.1"),
      ("the new command line does not describe the same machine",
       "it would build machine 'pc-q35-11.1', the VM runs 'pc-q35-10.0'",
       "(check extra arguments)"), id="dry-run-other-machine"),
    C("dry-run", EXEC, BASE, dry_(memdevs={"ram0": 512 * MIB}),
      ("memory backend ram0 would be 512 MiB, the VM has 256 MiB",), id="dry-run-other-size"),
    C("dry-run", EXEC, BASE, dry_(memdevs={}),
      ("memory backend ram0 would be missing, the VM has 256 MiB",), id="dry-run-no-memdev"),
    C("dry-run", EXEC, BASE, dry_(memdevs={"ram0": 256 * MIB, "ram1": MIB}),
      ("it would add memory backend ram1",), id="dry-run-extra-memdev"),
]


@pytest.mark.parametrize(("name", "mode", "vm_name", "edit", "needles"), FAILS)
def test_check_fails_with_its_message(load_vm: VmLoader, name: str, mode: CprMode,
                                      vm_name: str, edit: Edit,
                                      needles: tuple[str, ...]) -> None:
    good = good_inputs(load_vm(vm_name), RequestedMode(mode.value))
    p = edit(good)
    msg = run_check(name, p, mode)
    assert msg is not None, f"{name} passed"
    for needle in needles:
        assert needle in msg
    # The report carries the same failure under the same name.
    report = preflight.evaluate(p)
    [result] = [c for c in report.checks if c.name == name]
    assert (result.passed, result.message) == (False, msg)
    assert not report.passed
    assert result in report.failures()


PASSES = [
    C("runstate", EXEC, BASE, same, id="runstate-running"),
    C("runstate", EXEC, BASE, vm_(runstate="paused"), id="runstate-paused"),
    *[C("migration-idle", EXEC, BASE, vm_(migration_status=s), id=f"migration-{s}")
      for s in ("none", "completed", "failed", "cancelled")],
    # Its modes are not asked while it migrates: said by migration-idle, not as "no mode".
    C("mode-supported-by-running-qemu", EXEC, BASE,
      chain(vm_(migration_status="active"), old_(features(modes=()))), id="old-migrating"),
    C("memory-shared", EXEC, BASE, same, id="memory-memfd-exec"),
    C("memory-shared", TRANSFER, BASE, same, id="memory-memfd-transfer"),
    C("memory-shared", REBOOT, "memory-file-shm", same, id="memory-file-reboot"),
    C("memory-shared", EXEC, "memory-file-shm", same, id="memory-file-exec"),
    C("aux-ram-share", EXEC, BASE, same, id="aux-ram-share-on"),
    C("aux-ram-share", REBOOT, "aux-ram-share-off", same, id="aux-ram-share-off-reboot"),
    C("aux-ram-share", REBOOT, "qemu-9.2.0-no-aux-ram-share", same,
      id="aux-ram-share-absent-reboot"),
    C("legacy-cpr-dialect", EXEC, BASE, same, id="upstream-dialect"),
    C("mode-supported-by-running-qemu", EXEC, BASE, same, id="old-exec"),
    C("mode-supported-by-running-qemu", TRANSFER, BASE, same, id="old-transfer"),
    C("mode-supported-by-running-qemu", REBOOT, BASE, same, id="old-reboot"),
    C("mode-supported-by-running-qemu", TRANSFER, "qemu-10.0.2", same, id="old-10.0-transfer"),
    C("mode-supported-by-running-qemu", EXEC, "legacy-dialect", same,
      id="old-legacy-left-to-its-own-check"),
    C("migration-blockers", EXEC, BASE, same, id="no-blockers"),
    C("incompatible-capabilities", EXEC, BASE, same, id="no-capabilities"),
    C("incompatible-capabilities", EXEC, BASE,
      vm_(enabled_capabilities=("events", "x-ignore-shared", "multifd")),
      id="harmless-capabilities"),
    C("tap-by-fd", EXEC, BASE, same, id="no-taps"),
    C("tap-by-fd", EXEC, "tap-fd", same, id="tap-fd-exec"),
    C("tap-by-fd", REBOOT, "tap-ifname", same, id="tap-name-reboot"),
    C("vfio", REBOOT, BASE, same, id="no-vfio"),
    C("vfio", EXEC, "vfio-pci", same, id="vfio-exec-11.1"),
    C("vfio", TRANSFER, "vfio-pci", same, id="vfio-transfer-11.1"),
    C("vfio", EXEC, "vfio-pci-iommufd", same, id="iommufd-exec-11.1"),
    C("vfio", EXEC, "vfio-pci", chain(old_(features(V10_2)), new_(features(V10_2))),
      id="vfio-exec-10.2"),
    C("vfio", TRANSFER, "vfio-pci", chain(old_(features(V10_1)), new_(features(V10_1))),
      id="vfio-transfer-10.1"),
    C("vfio", TRANSFER, "vfio-pci", NO_PROBE, id="vfio-transfer-target-unprobed"),
    C("vhost", EXEC, "tap-fd", same, id="no-vhost"),
    C("vhost", EXEC, "tap-fd-vhost-vhostfd", same, id="vhostfd-exec"),
    C("vhost", TRANSFER, BASE, same, id="no-vhost-transfer"),
    C("hotplugged-devices", EXEC, BASE, same, id="nothing-hotplugged"),
    C("target-path", EXEC, BASE, same, id="target-absolute"),
    C("target-extra-args", EXEC, BASE, same, id="no-extra-args"),
    C("target-extra-args", EXEC, BASE, target_(extra_args=("-msg", "timestamp=on")),
      id="extra-args-msg"),
    C("target-exists", EXEC, BASE, same, id="target-exists"),
    C("target-executable", EXEC, BASE, same, id="target-executable"),
    C("target-allowed-directory", EXEC, BASE, same, id="allowed-inside"),
    C("target-allowed-directory", EXEC, BASE, host_(allowed_dirs=("/opt", "/usr/lib/qemu-new/")),
      id="allowed-trailing-slash"),
    C("target-allowed-directory", EXEC, BASE, bin_(real_path=""), id="allowed-no-real-path"),
    C("target-sha256", EXEC, BASE, same, id="sha256-not-requested"),
    C("target-sha256", EXEC, BASE, chain(target_(sha256="AB" * 32), bin_(sha256="ab" * 32)),
      id="sha256-match-any-case"),
    C("target-version", EXEC, BASE, same, id="version-not-pinned"),
    C("target-version", EXEC, BASE, target_(expected_version="11.1.3"), id="version-plain"),
    C("target-version", EXEC, BASE, target_(expected_version="11.1.3 (Debian 1:11.1.3+ds-1)"),
      id="version-with-package"),
    C("target-version", EXEC, BASE, target_(expected_version="Debian 1:11.1.3+ds-1"),
      id="version-package-only"),
    C("target-probe", EXEC, BASE, same, id="probe-ok"),
    C("mode-supported-by-target", EXEC, BASE, same, id="new-exec"),
    C("mode-supported-by-target", TRANSFER, BASE, new_(F10), id="new-10.0-transfer"),
    C("machine-type-known", EXEC, BASE, same, id="machine-known"),
    C("device-drivers-known", EXEC, "vfio-pci", same, id="drivers-known"),
    C("device-drivers-known", EXEC, BASE, probe_(qom_types=frozenset()), id="no-drivers-needed"),
    C("state-file-room", EXEC, BASE, same, id="room"),
    C("state-file-room", EXEC, BASE, host_(runtime_dir_free_bytes=64 * MIB), id="room-exact"),
    C("cpr-exec-guard", EXEC, BASE, same, id="guard-installed"),
    C("cpr-exec-guard", TRANSFER, BASE, host_(guard_path=None), id="guard-not-needed-transfer"),
    C("cpr-exec-guard", REBOOT, BASE, host_(guard_path=None), id="guard-not-needed-reboot"),
    C("cpr-exec-guard", EXEC, BASE, chain(host_(guard_path=None), inputs_(use_guard=False)),
      id="guard-not-used"),
    C("dry-run", EXEC, BASE, same, id="dry-run-same-machine"),
    C("dry-run", EXEC, BASE, dry_(machine_type=""), id="dry-run-machine-not-reported"),
]


@pytest.mark.parametrize(("name", "mode", "vm_name", "edit"), PASSES)
def test_check_passes(load_vm: VmLoader, name: str, mode: CprMode, vm_name: str,
                      edit: Edit) -> None:
    p = edit(good_inputs(load_vm(vm_name), RequestedMode(mode.value)))
    assert run_check(name, p, mode) is None
    report = preflight.evaluate(p)
    [result] = [c for c in report.checks if c.name == name]
    assert (result.passed, result.message) == (True, "ok")


def test_every_check_has_a_failing_and_a_passing_case() -> None:
    names = list(CHECKS)
    assert len(names) == len(preflight.VM_CHECKS) + len(preflight.TARGET_CHECKS)  # unique
    failing = {case.values[0] for case in FAILS}
    passing = {case.values[0] for case in PASSES}
    assert set(names) == failing == passing


# --- cpr-reboot and descriptors ---------------------------------------------------------------


def test_cpr_reboot_refuses_a_tap_passed_by_descriptor(load_vm: VmLoader) -> None:
    # cpr-reboot starts the new QEMU from the agent: it inherits none of the old QEMU's
    # descriptors, so `-netdev tap,fd=23` names a descriptor it does not have.
    vm = load_vm("tap-fd").model_copy(
        update={"memory_backends": load_vm("memory-file-shm").memory_backends})
    p = good_inputs(vm, RequestedMode.CPR_REBOOT)
    problems = [msg for _, check in preflight.VM_CHECKS if (msg := check(p, REBOOT))]
    assert any("net0" in m for m in problems), problems


def test_a_blocker_of_one_mode_does_not_refuse_another(load_vm: VmLoader) -> None:
    # Recorded: QEMU blocks only cpr-transfer for aux-ram-share=off (ROMs not shared); with RAM
    # in a /dev/shm file the VM can still use cpr-reboot, which copies ROMs into the state.
    vm = load_vm("memory-file-shm-aux-ram-share-off")
    p = good_inputs(vm, RequestedMode.CPR_REBOOT)
    assert preflight.check_blockers(p, TRANSFER) is not None
    assert preflight.check_blockers(p, REBOOT) is None
    assert REBOOT in preflight.readiness(vm).modes


def test_allowing_the_root_directory_allows_nothing(load_vm: VmLoader) -> None:
    """'/' is refused as an allowed directory (pathpolicy): it would allow every binary."""
    p = host_(allowed_dirs=("/",))(good_inputs(load_vm(BASE)))
    assert "outside the directories this host allows" in (
        preflight.check_target_allowed(p, EXEC) or "")


def test_the_path_rule_refusal_fails_the_check(load_vm: VmLoader) -> None:
    why = "target.binary: the directory /usr/lib/qemu-new is writable by others"
    p = bin_(policy_error=why)(good_inputs(load_vm(BASE)))
    assert preflight.check_target_allowed(p, EXEC) == why


# --- device classification per mode and version, on recorded answers ------------------------

DEVICE_CHECKS = ("tap-by-fd", "vfio", "vhost")


@pytest.mark.parametrize(("vm_name", "target", "mode", "accepted"), [
    C("vfio-pci", F11, EXEC, True, id="vfio-11.1-exec"),
    C("vfio-pci", F11, TRANSFER, True, id="vfio-11.1-transfer"),
    C("vfio-pci", F11, REBOOT, False, id="vfio-11.1-reboot"),
    C("vfio-pci", features(V10_2), EXEC, True, id="vfio-to-10.2-exec"),
    C("vfio-pci", features(V10_1), EXEC, False, id="vfio-to-10.1-exec"),
    C("vfio-pci", features(V10_1), TRANSFER, True, id="vfio-to-10.1-transfer"),
    C("vfio-pci", F10, TRANSFER, False, id="vfio-to-10.0-transfer"),
    C("qemu-10.0.2-vfio-pci", F11, TRANSFER, False, id="vfio-from-10.0-transfer"),
    C("vfio-pci-iommufd", F11, EXEC, True, id="iommufd-11.1-exec"),
    C("vfio-pci-iommufd", F11, TRANSFER, True, id="iommufd-11.1-transfer"),
    C("vfio-pci-iommufd", F11, REBOOT, False, id="iommufd-11.1-reboot"),
    C("vfio-pci-iommufd", F10, TRANSFER, False, id="iommufd-to-10.0-transfer"),
    C("tap-fd-vhost-vhostfd", F11, EXEC, True, id="vhostfd-exec"),
    C("tap-fd-vhost-vhostfd", F11, TRANSFER, False, id="vhostfd-transfer"),
    C("tap-fd-vhost-vhostfd", F11, REBOOT, False, id="vhostfd-reboot"),
    C("tap-fd-vhost-no-vhostfd", F11, EXEC, False, id="vhost-no-vhostfd-exec"),
    C("tap-fd-vhost-no-vhostfd", F11, TRANSFER, False, id="vhost-no-vhostfd-transfer"),
    C("tap-fd-vhost-no-vhostfd", F11, REBOOT, False, id="vhost-no-vhostfd-reboot"),
    C("vhost-user-net", F11, EXEC, False, id="vhost-user-exec"),
    C("vhost-user-net", F11, TRANSFER, False, id="vhost-user-transfer"),
    C("vhost-user-net", F11, REBOOT, False, id="vhost-user-reboot"),
    C("tap-fd", F11, EXEC, True, id="tap-fd-exec"),
    C("tap-fd", F11, TRANSFER, False, id="tap-fd-transfer"),
    C("tap-ifname", F11, EXEC, False, id="tap-name-exec"),
    C("tap-ifname", F11, TRANSFER, False, id="tap-name-transfer"),
    C("tap-ifname", F11, REBOOT, True, id="tap-name-reboot"),
])
def test_device_classification(load_vm: VmLoader, vm_name: str, target: QemuFeatures,
                               mode: CprMode, accepted: bool) -> None:
    p = good_inputs(load_vm(vm_name), RequestedMode(mode.value), new=target)
    problems = {name: msg for name in DEVICE_CHECKS if (msg := run_check(name, p, mode))}
    assert (not problems) == accepted, problems


# --- choose_mode ------------------------------------------------------------------------------

MODE_SETS = [tuple(m for m in ALL_MODES if m in combo)
             for n in range(4) for combo in itertools.combinations(ALL_MODES, n)]


def expected_mode(requested: RequestedMode, old: QemuFeatures, new: QemuFeatures | None,
                  prefer: Preference = Preference.SAME_PID) -> CprMode | None:
    """The rule, written out independently of the implementation."""
    if requested != RequestedMode.AUTO:
        mode = CprMode(requested.value)
        supported = mode in old.cpr_modes and (new is None or mode in new.cpr_modes)
        return mode if supported else None
    if new is None:
        return None
    possible = []
    if EXEC in old.cpr_modes and EXEC in new.cpr_modes and old.has_cpr_exec_command:
        possible.append(EXEC)
    if TRANSFER in old.cpr_modes and TRANSFER in new.cpr_modes:
        possible.append(TRANSFER)
    first = {Preference.SAME_PID: EXEC, Preference.SHORTEST_PAUSE: TRANSFER}[prefer]
    if first in possible:
        return first
    return possible[0] if possible else None


def test_choose_mode_exhaustively() -> None:
    """Every request x preference x the running QEMU's modes and cpr-exec-command x the
    target's (or none, unprobed)."""
    olds = [features(V11, modes, cmd=cmd) for modes in MODE_SETS for cmd in (False, True)]
    news: list[QemuFeatures | None] = [None, *(features(V10, modes, cmd=cmd)
                                               for modes in MODE_SETS for cmd in (False, True))]
    seen = 0
    for requested, prefer, old, new in itertools.product(RequestedMode, Preference, olds, news):
        mode, why = preflight.choose_mode(requested, old, new, prefer)
        assert mode == expected_mode(requested, old, new, prefer), (requested, old, new, why)
        assert why
        if requested == RequestedMode.AUTO:
            assert why.startswith("Auto")
            # The reason names the preference whenever it decided, or was overruled.
            if mode is not None and prefer == Preference.SHORTEST_PAUSE:
                assert "shortest pause was preferred" in why, why
            if mode == TRANSFER and prefer == Preference.SAME_PID:
                assert "same pid cannot be kept" in why, why
        else:
            assert str(requested) in why
            # A named mode ignores the preference.
            assert (mode, why) == preflight.choose_mode(requested, old, new)
        seen += 1
    assert seen == 4 * 2 * 16 * 17


def test_choose_mode_defaults_to_the_same_pid() -> None:
    assert preflight.choose_mode(RequestedMode.AUTO, F11, F11)[0] == EXEC
    assert preflight.choose_mode(RequestedMode.AUTO, F11, F11, Preference.SAME_PID)[0] == EXEC


@pytest.mark.parametrize(("old", "new", "mode", "needles"), [
    C(F11, F11, TRANSFER, ("Auto chose cpr-transfer: the shortest pause was preferred",
                           "the VM gets a new pid", "both support cpr-transfer"), id="both"),
    C(features(V11, (EXEC,)), F11, EXEC,
      ("Auto chose cpr-exec", "the shortest pause was preferred but cpr-transfer is not "
       "supported by both"), id="old-lacks-transfer"),
    C(F11, features(V11, (EXEC, REBOOT)), EXEC, ("cpr-transfer is not supported by both",),
      id="new-lacks-transfer"),
    C(F10, F11, TRANSFER, ("the shortest pause was preferred",), id="old-10.0"),
    C(features(V9_2, (REBOOT,), cmd=False), F11, None,
      ("Auto found no CPR mode both QEMUs support",), id="never-reboot"),
    C(F11, None, None, ("the new binary could not be probed",), id="unprobed"),
])
def test_auto_with_shortest_pause(old: QemuFeatures, new: QemuFeatures | None,
                                  mode: CprMode | None, needles: tuple[str, ...]) -> None:
    got, why = preflight.choose_mode(RequestedMode.AUTO, old, new, Preference.SHORTEST_PAUSE)
    assert got == mode, why
    for needle in needles:
        assert needle in why


@pytest.mark.parametrize(("requested", "old", "new", "mode", "needles"), [
    C(RequestedMode.AUTO, F11, F11, EXEC,
      ("Auto chose cpr-exec: both QEMUs support cpr-exec",), id="auto-exec"),
    C(RequestedMode.AUTO, F11, features(cmd=False), EXEC, ("Auto chose cpr-exec",),
      id="auto-exec-only-old-needs-the-command"),
    C(RequestedMode.AUTO, F11, F10, TRANSFER,
      ("Auto chose cpr-transfer", "running 11.1.3, target 10.0.2", "both support cpr-transfer"),
      id="auto-transfer-new-10.0"),
    C(RequestedMode.AUTO, F10, F11, TRANSFER,
      ("Auto chose cpr-transfer", "cpr-exec needs QEMU >= 10.2 on both sides",
       "running 10.0.2, target 11.1.3"), id="auto-transfer-old-10.0"),
    C(RequestedMode.AUTO, F10, F10, TRANSFER, ("running 10.0.2, target 10.0.2",),
      id="auto-transfer-both-10.0"),
    C(RequestedMode.AUTO, F11, None, None,
      ("Auto cannot choose a mode: the new binary could not be probed",), id="auto-unprobed"),
    C(RequestedMode.AUTO, features(V9_2, (REBOOT,), cmd=False), F11, None,
      ("Auto found no CPR mode both QEMUs support", "running 9.2.0: cpr-reboot",
       "target 11.1.3: cpr-reboot, cpr-transfer, cpr-exec", "QEMU >= 10.0 is needed on both"),
      id="auto-never-picks-reboot"),
    C(RequestedMode.AUTO, features(V7, ()), F11, None, ("running 7.2.0: none",),
      id="auto-old-without-cpr"),
    C(RequestedMode.AUTO, F11, features(V7, ()), None, ("target 7.2.0: none",),
      id="auto-new-without-cpr"),
    C(RequestedMode.CPR_EXEC, F11, F11, EXEC, ("cpr-exec was requested",), id="exec"),
    C(RequestedMode.CPR_EXEC, F11, None, EXEC,
      ("cpr-exec was requested (the new binary could not be probed)",), id="exec-unprobed"),
    C(RequestedMode.CPR_EXEC, F10, F11, None,
      ("cpr-exec was requested but the running QEMU 10.0.2 does not support it",
       "ask for Auto or a mode both support"), id="exec-old-lacks"),
    C(RequestedMode.CPR_EXEC, F11, F10, None,
      ("cpr-exec was requested but the target QEMU 10.0.2 does not support it",),
      id="exec-new-lacks"),
    C(RequestedMode.CPR_EXEC, F10, F10, None,
      ("the running QEMU 10.0.2 and the target QEMU 10.0.2",), id="exec-both-lack"),
    C(RequestedMode.CPR_EXEC, F10, None, None, ("the running QEMU 10.0.2",),
      id="exec-old-lacks-new-unprobed"),
    C(RequestedMode.CPR_TRANSFER, F10, F11, TRANSFER, ("cpr-transfer was requested",),
      id="transfer"),
    C(RequestedMode.CPR_TRANSFER, features(V9_2, (REBOOT,)), F11, None,
      ("the running QEMU 9.2.0 does not support it",), id="transfer-old-lacks"),
    C(RequestedMode.CPR_REBOOT, F11, F10, REBOOT, ("cpr-reboot was requested",), id="reboot"),
    C(RequestedMode.CPR_REBOOT, F11, features(V11, (EXEC, TRANSFER)), None,
      ("the target QEMU 11.1.3 does not support it",), id="reboot-new-lacks"),
])
def test_choose_mode(requested: RequestedMode, old: QemuFeatures, new: QemuFeatures | None,
                     mode: CprMode | None, needles: tuple[str, ...]) -> None:
    got, why = preflight.choose_mode(requested, old, new)
    assert got == mode
    for needle in needles:
        assert needle in why


def test_auto_names_the_missing_cpr_exec_command_when_that_is_why() -> None:
    # Both are 11.1.3 and list cpr-exec; only the running one's cpr-exec-command parameter is
    # missing. "cpr-exec needs QEMU >= 10.2 on both sides" would send the operator after a
    # version they already have.
    mode, why = preflight.choose_mode(RequestedMode.AUTO, features(cmd=False), F11)
    assert mode == TRANSFER
    assert "cpr-exec-command" in why
    assert ">= 10.2" not in why


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_all_good(load_vm: VmLoader) -> None:
    report = preflight.evaluate(good_inputs(load_vm(BASE)))
    assert report.passed
    assert report.mode == EXEC
    assert report.mode_reason.startswith("Auto chose cpr-exec")
    assert (report.vm, report.target) == ("manual1", NEW)
    assert [c.name for c in report.checks] == ["mode", *CHECKS]
    assert report.checks[0].message == report.mode_reason
    assert all(c.passed and c.message == "ok" for c in report.checks[1:])
    assert report.failures() == ()


def test_evaluate_auto_against_qemu_10_uses_cpr_transfer(load_vm: VmLoader) -> None:
    # The VM has a tap by fd: fine for cpr-exec, refused by cpr-transfer: the report judges the
    # chosen mode.
    p = new_(F10)(good_inputs(load_vm("tap-fd")))
    report = preflight.evaluate(p)
    assert report.mode == TRANSFER
    assert [c.name for c in report.failures()] == ["tap-by-fd"]
    assert preflight.evaluate(good_inputs(load_vm("tap-fd"))).passed


def test_evaluate_follows_the_preference(load_vm: VmLoader) -> None:
    # The same tap-by-fd VM and QEMUs that can do both: the preference picks the mode, and the
    # checks judge the mode picked (cpr-transfer refuses the tap by fd).
    p = replace(good_inputs(load_vm("tap-fd")), prefer=Preference.SHORTEST_PAUSE)
    report = preflight.evaluate(p)
    assert report.mode == TRANSFER
    assert "shortest pause was preferred" in report.mode_reason
    assert [c.name for c in report.failures()] == ["tap-by-fd"]
    report = preflight.evaluate(replace(p, prefer=Preference.SAME_PID))
    assert report.mode == EXEC and report.passed


def test_evaluate_memfd_vm_asked_for_cpr_reboot(load_vm: VmLoader) -> None:
    report = preflight.evaluate(good_inputs(load_vm(BASE), RequestedMode.CPR_REBOOT))
    assert report.mode == REBOOT
    assert not report.passed
    assert [(c.name, c.passed) for c in report.failures()] == [("memory-shared", False)]
    assert "cpr-reboot needs memory-backend-file on /dev/shm" in report.failures()[0].message


def test_evaluate_file_backed_vm_asked_for_cpr_reboot(load_vm: VmLoader) -> None:
    report = preflight.evaluate(good_inputs(load_vm("memory-file-shm"),
                                            RequestedMode.CPR_REBOOT))
    assert report.mode == REBOOT and report.passed


def test_evaluate_without_a_mode_still_lists_every_problem(load_vm: VmLoader) -> None:
    p = chain(NO_PROBE, inputs_(dry_run=None), host_(guard_path=None))(
        good_inputs(load_vm("tap-ifname")))
    report = preflight.evaluate(p)
    assert report.mode is None and not report.passed
    assert report.checks[0].name == "mode"
    assert not report.checks[0].passed
    assert "could not be probed" in report.checks[0].message
    names = [c.name for c in report.checks]
    assert "dry-run" not in names  # nothing was run, and no mode to run it for
    assert names == ["mode", *(n for n in CHECKS if n != "dry-run")]
    # Judged as cpr-exec, the preferred mode.
    assert {c.name for c in report.failures()} == {
        "mode", "tap-by-fd", "target-probe", "mode-supported-by-target", "machine-type-known",
        "device-drivers-known", "cpr-exec-guard"}


def test_evaluate_judges_an_unsupported_requested_mode_as_that_mode(load_vm: VmLoader) -> None:
    p = new_(F10)(good_inputs(load_vm(BASE), RequestedMode.CPR_EXEC))
    report = preflight.evaluate(p)
    assert report.mode is None
    assert "the target QEMU 10.0.2 does not support it" in report.mode_reason
    assert {c.name for c in report.failures()} == {"mode", "mode-supported-by-target"}


def test_evaluate_with_a_mode_but_no_dry_run_fails(load_vm: VmLoader) -> None:
    report = preflight.evaluate(inputs_(dry_run=None)(good_inputs(load_vm(BASE))))
    assert report.mode == EXEC
    assert [c.name for c in report.failures()] == ["dry-run"]


# --- readiness --------------------------------------------------------------------------------


@pytest.mark.parametrize(("vm_name", "edit", "ready", "modes", "needles"), [
    C(BASE, same, True, (EXEC, TRANSFER), (), id="memfd-11.1"),
    C("memory-file-shm", same, True, (EXEC, TRANSFER, REBOOT), (), id="file-11.1"),
    C("qemu-10.0.2", same, True, (TRANSFER,), (), id="memfd-10.0"),
    C(BASE, old_(features(cmd=False)), True, (TRANSFER,),
      ("cpr-exec: the running QEMU 11.1.3 lists cpr-exec but has no cpr-exec-command",),
      id="cpr-exec-unusable-is-explained"),
    C("tap-fd", same, True, (EXEC,), (), id="tap-fd"),
    C("tap-ifname", same, False, (),
      ("opens tap 'tap0' by name", "netdevs net0 are taps", "ram0 is a memfd"), id="tap-name"),
    C("legacy-dialect", same, False, (), ("out-of-tree CPR dialect",), id="legacy"),
    C("qemu-9.2.0-no-aux-ram-share", same, False, (), ("ram0 is a memfd",), id="qemu-9.2"),
    C(BASE, old_(features(V7, ())), False, (),
      ("does not support cpr-transfer (it has: no CPR mode)",), id="qemu-7.2"),
    C("vfio-pci", same, True, (EXEC, TRANSFER), (), id="vfio-11.1"),
    C("qemu-10.0.2-vfio-pci", same, False, (), ("only from QEMU 10.1",), id="vfio-10.0"),
    C("runstate-inmigrate", same, False, (), ("the VM is 'inmigrate'",), id="inmigrate"),
    C(BASE, chain(vm_(migration_status="active"), old_(features(modes=()))), False, (),
      ("already migrating this VM",), id="migrating"),
    C("migration-blocker-all-modes", same, False, (), ("VirtFS",), id="blocked"),
    C("memory-ram-share-off", same, False, (), ("ram0 is ram with share=off",), id="ram"),
])
def test_readiness(load_vm: VmLoader, vm_name: str, edit: Edit, ready: bool,
                   modes: tuple[CprMode, ...], needles: tuple[str, ...]) -> None:
    vm = edit(good_inputs(load_vm(vm_name))).vm
    r = preflight.readiness(vm)
    assert (r.ready, r.modes) == (ready, modes)
    text = "\n".join(r.reasons)
    for needle in needles:
        assert needle in text
    if not needles:
        assert r.reasons == ()
    assert len(set(r.reasons)) == len(r.reasons)


def test_readiness_counts_hotplugged_devices(load_raw: Callable[[str], dict[str, Any]]) -> None:
    raw = load_raw("hotplugged-device")
    vm = discovery.build_vm_info(raw)
    assert preflight.readiness(vm).ready
    r = preflight.readiness(vm, discovery.hotplugged_devices(raw))
    assert not r.ready and r.modes == ()
    assert any("devices disk1 were hot-plugged" in reason for reason in r.reasons)


def test_readiness_explains_why_only_cpr_reboot_is_left(load_vm: VmLoader) -> None:
    # QEMU 10.0.2, RAM in a /dev/shm file, a tap by name: cpr-transfer is refused (taps), only
    # cpr-reboot is left, which does not count as ready: the reasons must say why.
    file_vm = load_vm("memory-file-shm")
    vm = load_vm("qemu-10.0.2").model_copy(update={
        "memory_backends": file_vm.memory_backends,
        "taps": (TapDevice(id="net0", ifname="tap0"),)})
    r = preflight.readiness(vm)
    assert r.modes == (REBOOT,)
    assert not r.ready
    assert any("net0" in reason for reason in r.reasons), r.reasons
