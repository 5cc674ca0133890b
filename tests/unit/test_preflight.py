"""Preflight: every named check, failing with its message and passing, on VMs built from
recorded discovery answers (the report and readiness: test_preflight_report.py; the mode
choice: test_modechoice.py).

Over 450 lines: it is the one table of every check's failing and passing cases, which
`test_every_check_has_a_failing_and_a_passing_case` holds against the checks themselves."""

from __future__ import annotations

import pytest

from tests.unit.preflight_inputs import (
    BASE,
    CHECKS,
    FAILED_PROBE,
    MIB,
    NEW,
    NO_PROBE,
    Edit,
    VmLoader,
    bin_,
    chain,
    dry_,
    good_inputs,
    host_,
    inputs_,
    new_,
    old_,
    probe_,
    run_check,
    same,
    target_,
    vm_,
)
from tests.unit.qemu_features import (
    EXEC,
    F10,
    F11,
    REBOOT,
    TRANSFER,
    V7,
    V9_1,
    V10_1,
    V10_2,
    features,
)
from vmupdate_agent import preflight
from vmupdate_agent.models import (
    CprMode,
    MemoryBackend,
    QemuFeatures,
    QemuVersion,
    RequestedMode,
    TapDevice,
)

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


