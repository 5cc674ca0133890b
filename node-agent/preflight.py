"""Preflight: is it safe to update this VM to this target in this mode? Pure decisions.

Every check has a stable name and, when it fails, a message that says what is wrong and what
to do about it. Inputs are plain facts gathered elsewhere (discovery, target probes, the
dry run, the host's free space); nothing here does I/O.

The mode choice the report starts with is its own module (`modechoice`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmupdate_agent import pathpolicy, vhost_user
from vmupdate_agent.modechoice import choose_mode
from vmupdate_agent.models import (
    MIGRATION_IDLE,
    CheckResult,
    CprMode,
    Preference,
    PreflightReport,
    Readiness,
    RequestedMode,
    Target,
    VMInfo,
)
from vmupdate_agent.target import BinaryFacts, DryRunFacts, ProbeFacts
from vmupdate_api import extra_args

# Versions that first preserved each kind of device across each mode (QEMU's CPR docs).
VFIO_MIN_VERSION: dict[CprMode, tuple[int, int]] = {
    CprMode.CPR_TRANSFER: (10, 1),
    CprMode.CPR_EXEC: (10, 2),
}
RUNSTATES_OK = ("running", "paused")
STATE_FILE_ROOM_BYTES = 64 << 20  # the state file is ~80 KB; keep a wide margin


@dataclass(frozen=True)
class HostFacts:
    allowed_dirs: tuple[str, ...]
    runtime_dir_free_bytes: int
    runtime_dir_shared: bool = True  # visible to QEMU at the same path
    guard_path: str | None = None  # the guard as QEMU sees it, None when not installed
    hotplugged: tuple[str, ...] = ()
    unplugged: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreflightInputs:
    vm: VMInfo
    target: Target
    requested: RequestedMode
    host: HostFacts
    binary: BinaryFacts
    probe: ProbeFacts | None = None
    dry_run: DryRunFacts | None = None
    use_guard: bool = True
    extra: dict[str, str] = field(default_factory=dict)
    prefer: Preference = Preference.SAME_PID


# --- VM-only checks (also give the VM's readiness in the inventory) -------------------------

Check = Callable[[PreflightInputs, CprMode], str | None]


def check_runstate(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.vm.runstate in RUNSTATES_OK:
        return None
    return (f"the VM is {p.vm.runstate!r}; CPR starts only from running or paused. Wait for "
            "the operation that put it there to finish, or resume it first")


def check_migration_idle(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.vm.migration_status in MIGRATION_IDLE:
        return None
    return (f"QEMU is already migrating this VM (migration status {p.vm.migration_status!r}); "
            "wait for that migration to end, or cancel it (QMP migrate_cancel) first")


def check_memory_shared(p: PreflightInputs, mode: CprMode) -> str | None:
    if not p.vm.memory_backends:
        return ("guest RAM is not in a memory backend: start QEMU with -machine "
                "memory-backend=ram0 -object memory-backend-memfd,id=ram0,size=...,share=on")
    bad = [b for b in p.vm.memory_backends if not b.share or b.kind not in ("memfd", "file")]
    if bad:
        return "; ".join(
            f"memory backend {b.id} is {b.kind} with share={'on' if b.share else 'off'}: "
            "CPR keeps RAM in place only in memory-backend-memfd or memory-backend-file "
            "with share=on" for b in bad)
    if mode == CprMode.CPR_REBOOT:
        memfds = [b.id for b in p.vm.memory_backends if b.kind == "memfd"]
        if memfds:
            return (f"memory backend {', '.join(memfds)} is a memfd, which dies with the QEMU "
                    "process: cpr-reboot needs memory-backend-file on /dev/shm (share=on); "
                    "use cpr-exec or cpr-transfer for this VM")
    return None


def check_aux_ram_share(p: PreflightInputs, mode: CprMode) -> str | None:
    if mode == CprMode.CPR_REBOOT or p.vm.aux_ram_share:
        return None
    if p.vm.aux_ram_share is None:
        return (f"QEMU {p.vm.features.version} has no aux-ram-share machine option; {mode} "
                "needs it (QEMU >= 10.0)")
    return (f"-machine aux-ram-share=off: ROMs and firmware RAM would be copied, which {mode} "
            "cannot do; start QEMU with -machine ...,aux-ram-share=on")


def check_mode_old(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.vm.features.legacy_cpr_dialect:
        return None  # reported by check_legacy_dialect
    if p.vm.migration_status not in MIGRATION_IDLE:
        return None  # its modes are not asked while it migrates: check_migration_idle
    if mode not in p.vm.features.cpr_modes:
        return (f"the running QEMU {p.vm.features.version} does not support {mode} (it has: "
                f"{', '.join(p.vm.features.cpr_modes) or 'no CPR mode'})")
    if mode == CprMode.CPR_EXEC and not p.vm.features.has_cpr_exec_command:
        return (f"the running QEMU {p.vm.features.version} lists cpr-exec but has no "
                "cpr-exec-command migration parameter")
    return None


def check_legacy_dialect(p: PreflightInputs, mode: CprMode) -> str | None:
    if not p.vm.features.legacy_cpr_dialect:
        return None
    return (f"the running QEMU {p.vm.features.version} speaks the older out-of-tree CPR "
            "dialect (-migrate-mode-enable, cpr-exec-args), which has known bugs (a zombie "
            "after a failed exec, a second update failing) and is not supported; run an "
            "upstream QEMU >= 10.0")


def check_blockers(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.vm.blockers_by_mode:
        blockers = p.vm.blockers_by_mode.get(mode.value, ())
    else:
        blockers = p.vm.migration_blockers
    if not blockers:
        return None
    return f"QEMU blocks {mode}: " + "; ".join(blockers)


def check_capabilities(p: PreflightInputs, mode: CprMode) -> str | None:
    bad = [c for c in p.vm.enabled_capabilities
           if c in ("x-colo", "postcopy-ram", "background-snapshot", "postcopy-preempt")]
    if not bad:
        return None
    return (f"migration capabilities {', '.join(bad)} are enabled and cannot be combined with "
            "CPR: turn them off (migrate-set-capabilities) first")


def check_taps(p: PreflightInputs, mode: CprMode) -> str | None:
    by_name = [t for t in p.vm.taps if t.fd is None]
    if mode == CprMode.CPR_EXEC and by_name:
        return "; ".join(
            f"netdev {t.id} opens tap {t.ifname!r} by name: after cpr-exec the new QEMU finds "
            "it busy. Pass the tap as fd=N (an inherited descriptor) instead of ifname="
            for t in by_name)
    if mode == CprMode.CPR_TRANSFER and p.vm.taps:
        return (f"netdevs {', '.join(t.id for t in p.vm.taps)} are taps: cpr-transfer cannot "
                "hand tap descriptors to the new QEMU in this QEMU; use cpr-exec with fd=N")
    by_fd = [t for t in p.vm.taps if t.fd is not None]
    if mode == CprMode.CPR_REBOOT and by_fd:
        return (f"netdevs {', '.join(t.id for t in by_fd)} use inherited tap descriptors "
                "(fd=N), which a restarted QEMU would not have; use cpr-exec, or ifname= for "
                "cpr-reboot")
    return None


def check_vfio(p: PreflightInputs, mode: CprMode) -> str | None:
    devices = [*p.vm.vfio_devices, *p.vm.iommufd_objects]
    if not devices:
        return None
    if mode == CprMode.CPR_REBOOT:
        return (f"{', '.join(devices)}: cpr-reboot keeps vfio devices only for a guest "
                "suspended to RAM; use cpr-transfer or cpr-exec")
    need = VFIO_MIN_VERSION[mode]
    olds = [("running", p.vm.features.version)]
    if p.probe is not None and p.probe.features is not None:
        olds.append(("target", p.probe.features.version))
    short = [f"{who} QEMU {v}" for who, v in olds if not v.at_least(*need)]
    if short:
        return (f"{', '.join(devices)}: {mode} preserves vfio/iommufd devices only from QEMU "
                f"{need[0]}.{need[1]}; {' and '.join(short)} is older")
    return None


def check_vhost(p: PreflightInputs, mode: CprMode) -> str | None:
    """Kernel vhost of taps here; vhost-user, vDPA and kernel vhost devices per mode in
    vhost_user (the table measured on QEMU 11.1.3: docs/vhost-user.md)."""
    problems = [f"netdev {t.id} uses vhost=on without vhostfd=: the new QEMU would reopen "
                "/dev/vhost-net; pass the descriptor with vhostfd=N"
                for t in p.vm.taps if t.vhost and t.vhostfd is None]
    if mode != CprMode.CPR_EXEC:
        problems += [f"netdev {t.id}: vhost descriptors cannot be handed over by {mode}"
                     for t in p.vm.taps if t.vhost and t.vhostfd is not None]
    problems += vhost_user.problems(p.vm.argv, mode, p.vm.readconfig_options)
    return "; ".join(problems) or None


def check_hotplug(p: PreflightInputs, mode: CprMode) -> str | None:
    problems = []
    if p.host.hotplugged:
        problems.append(f"devices {', '.join(p.host.hotplugged)} were hot-plugged and are not "
                        "on the command line, so the new QEMU would not create them; unplug "
                        "them first")
    if p.host.unplugged:
        problems.append(f"devices {', '.join(p.host.unplugged)} were hot-unplugged but are on "
                        "the command line, so the new QEMU would create them again; plug them "
                        "back first")
    return "; ".join(problems) or None


VM_CHECKS: tuple[tuple[str, Check], ...] = (
    ("runstate", check_runstate),
    ("migration-idle", check_migration_idle),
    ("memory-shared", check_memory_shared),
    ("aux-ram-share", check_aux_ram_share),
    ("legacy-cpr-dialect", check_legacy_dialect),
    ("mode-supported-by-running-qemu", check_mode_old),
    ("migration-blockers", check_blockers),
    ("incompatible-capabilities", check_capabilities),
    ("tap-by-fd", check_taps),
    ("vfio", check_vfio),
    ("vhost", check_vhost),
    ("hotplugged-devices", check_hotplug),
)


def readiness(vm: VMInfo, hotplugged: Sequence[str] = ()) -> Readiness:
    """Which CPR modes this VM could use today, and what stands in the way of the rest."""
    host = HostFacts(allowed_dirs=(), runtime_dir_free_bytes=1 << 62,
                     hotplugged=tuple(hotplugged))
    p = PreflightInputs(vm=vm, target=Target(binary="/"), requested=RequestedMode.AUTO,
                        host=host, binary=BinaryFacts(path="/", exists=False))
    usable: list[CprMode] = []
    reasons: dict[str, None] = {}
    live = (CprMode.CPR_EXEC, CprMode.CPR_TRANSFER)
    candidates = [m for m in (CprMode.CPR_EXEC, CprMode.CPR_TRANSFER, CprMode.CPR_REBOOT)
                  if m in vm.features.cpr_modes] or [CprMode.CPR_TRANSFER]
    per_mode: dict[CprMode, list[str]] = {}
    for mode in candidates:
        problems = [msg for _, check in VM_CHECKS if (msg := check(p, mode))]
        per_mode[mode] = problems
        if not problems:
            usable.append(mode)
    # Ready means an in-place update without a restart is possible (cpr-exec or
    # cpr-transfer), or cpr-reboot when that is all this QEMU has.
    ready = any(m in usable for m in live) or (usable == [CprMode.CPR_REBOOT]
                                                 and candidates == [CprMode.CPR_REBOOT])
    for mode, problems in per_mode.items():
        if mode in usable:
            continue
        if ready and mode != CprMode.CPR_EXEC:
            continue
        for msg in problems:
            reasons[f"{mode}: {msg}"] = None
    return Readiness(ready=ready, modes=tuple(usable), reasons=tuple(reasons))


# --- target checks --------------------------------------------------------------------------


def check_target_path(p: PreflightInputs, mode: CprMode) -> str | None:
    path = p.target.binary
    if not path.startswith("/"):
        return f"target binary {path!r} is not an absolute path"
    if ".." in path.split("/"):
        return f"target binary {path!r} contains '..': give the plain absolute path"
    return None


def check_extra_args(p: PreflightInputs, mode: CprMode) -> str | None:
    problems = extra_args.problems(p.target.extra_args, "target.extra_args")
    if not problems:
        return None
    return "; ".join(problems) + " — nothing was run with them"


def check_target_exists(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.binary.exists and p.binary.is_file:
        return None
    if p.binary.exists:
        return f"target {p.target.binary} is not a regular file"
    return (f"target {p.target.binary} does not exist in the VM's root; install the new QEMU "
            "there first")


def check_target_executable(p: PreflightInputs, mode: CprMode) -> str | None:
    if not p.binary.exists:
        return "target does not exist"
    if p.binary.executable:
        return None
    return f"target {p.target.binary} is not executable (chmod +x, or fix the path)"


def check_target_allowed(p: PreflightInputs, mode: CprMode) -> str | None:
    if not p.host.allowed_dirs:
        return ("this host allows no target directories (allowed_binary_dirs is empty in the "
                "agent's configuration)")
    return (pathpolicy.outside_allowed(p.target.binary, p.host.allowed_dirs,
                                       resolved=p.binary.real_path or None)
            or p.binary.policy_error or None)


def check_target_sha256(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.target.sha256 is None:
        return None
    if p.binary.sha256 is None:
        return "sha256 was requested but the target could not be read"
    if p.binary.sha256.lower() != p.target.sha256.lower():
        return (f"target {p.target.binary} has sha256 {p.binary.sha256}, expected "
                f"{p.target.sha256.lower()}: the file on this host is not the build you meant")
    return None


def check_target_version(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.binary.version_error:
        return p.binary.version_error
    if p.binary.version is None:
        return "the target's version is unknown"
    expected = p.target.expected_version
    if expected is None:
        return None
    got = p.binary.version
    if expected in (str(got), f"{got} ({got.package})", got.package):
        return None
    return (f"target {p.target.binary} is QEMU {got}"
            + (f" ({got.package})" if got.package else "")
            + f", expected {expected}")


def check_probe(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.probe is None:
        return "the target was not probed"
    return None if p.probe.ok else p.probe.error


def check_mode_new(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.probe is None or p.probe.features is None:
        return "the target's CPR modes are unknown (probe failed)"
    f = p.probe.features
    if f.legacy_cpr_dialect:
        return (f"the target QEMU {f.version} speaks the older out-of-tree CPR dialect "
                "(-migrate-mode-enable, cpr-exec-args); use an upstream QEMU >= 10.0")
    if mode not in f.cpr_modes:
        return (f"the target QEMU {f.version} does not support {mode} (it has: "
                f"{', '.join(f.cpr_modes) or 'no CPR mode'})")
    return None


def check_machine_type(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.probe is None or not p.probe.ok:
        return "unknown: the target could not be probed"
    if p.vm.machine_type in p.probe.machine_types:
        return None
    return (f"the target QEMU does not know machine type {p.vm.machine_type!r}, which the VM "
            "runs; choose a QEMU that still has it")


def check_device_drivers(p: PreflightInputs, mode: CprMode) -> str | None:
    if p.probe is None or not p.probe.ok:
        return "unknown: the target could not be probed"
    missing = [d for d in p.vm.device_drivers if d not in p.probe.qom_types]
    if not missing:
        return None
    return f"the target QEMU lacks device driver(s) the VM uses: {', '.join(missing)}"


def check_dry_run(p: PreflightInputs, mode: CprMode) -> str | None:
    d = p.dry_run
    if d is None and check_extra_args(p, mode) is not None:
        return "not run: the extra arguments are not allowed (see target-extra-args)"
    if d is None:
        return "the dry run did not run"
    if not d.ok:
        return (f"the new QEMU refused the VM's command line in a dry run: {d.error} — "
                "nothing was changed")
    problems = []
    if d.machine_type and d.machine_type != p.vm.machine_type:
        problems.append(f"it would build machine {d.machine_type!r}, the VM runs "
                        f"{p.vm.machine_type!r}")
    live = {b.id: b.size_bytes for b in p.vm.memory_backends}
    for mem_id, size in live.items():
        if d.memdevs.get(mem_id) != size:
            got = d.memdevs.get(mem_id)
            problems.append(f"memory backend {mem_id} would be "
                            f"{'missing' if got is None else f'{got >> 20} MiB'}, the VM has "
                            f"{size >> 20} MiB")
    for mem_id in d.memdevs.keys() - live.keys():
        problems.append(f"it would add memory backend {mem_id}")
    if problems:
        return ("the new command line does not describe the same machine: "
                + "; ".join(problems) + " (check extra arguments)")
    return None


def check_state_room(p: PreflightInputs, mode: CprMode) -> str | None:
    if not p.host.runtime_dir_shared:
        return ("the agent's runtime directory is not visible to QEMU at the same path; "
                "mount it into the VM's root (or the QEMU container) at the same path")
    if p.host.runtime_dir_free_bytes >= STATE_FILE_ROOM_BYTES:
        return None
    return (f"only {p.host.runtime_dir_free_bytes >> 20} MiB free in the runtime directory; "
            f"the state file needs {STATE_FILE_ROOM_BYTES >> 20} MiB of headroom")


def check_guard(p: PreflightInputs, mode: CprMode) -> str | None:
    if mode != CprMode.CPR_EXEC or not p.use_guard or p.host.guard_path:
        return None
    return ("the cpr-exec guard is not installed where QEMU can exec it; without it a failed "
            "exec would lose the VM")


TARGET_CHECKS: tuple[tuple[str, Check], ...] = (
    ("target-path", check_target_path),
    ("target-extra-args", check_extra_args),
    ("target-exists", check_target_exists),
    ("target-executable", check_target_executable),
    ("target-allowed-directory", check_target_allowed),
    ("target-sha256", check_target_sha256),
    ("target-version", check_target_version),
    ("target-probe", check_probe),
    ("mode-supported-by-target", check_mode_new),
    ("machine-type-known", check_machine_type),
    ("device-drivers-known", check_device_drivers),
    ("state-file-room", check_state_room),
    ("cpr-exec-guard", check_guard),
    ("dry-run", check_dry_run),
)


def evaluate(p: PreflightInputs) -> PreflightReport:
    new_features = p.probe.features if p.probe is not None else None
    mode, why = choose_mode(p.requested, p.vm.features, new_features, p.prefer)
    checks: list[CheckResult] = []
    # Without a mode the mode-specific checks still run against the requested (or preferred)
    # one, so the report lists every problem at once.
    as_mode = mode or (CprMode(p.requested.value) if p.requested != RequestedMode.AUTO
                       else CprMode.CPR_EXEC)
    for name, check in (*VM_CHECKS, *TARGET_CHECKS):
        if name == "dry-run" and p.dry_run is None and mode is None:
            continue
        msg = check(p, as_mode)
        checks.append(CheckResult(name=name, passed=msg is None, message=msg or "ok"))
    checks.insert(0, CheckResult(name="mode", passed=mode is not None, message=why))
    return PreflightReport(vm=p.vm.name, target=p.target.binary, mode=mode, mode_reason=why,
                           checks=tuple(checks))
