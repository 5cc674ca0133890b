"""Good preflight inputs for a VM, the edits that break one thing each, and the checks by name:
what the preflight tests build their cases from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tests.unit.qemu_features import F11
from vmupdate_agent import preflight
from vmupdate_agent.models import (
    CprMode,
    QemuFeatures,
    RequestedMode,
    Target,
    VMInfo,
)
from vmupdate_agent.preflight import HostFacts, PreflightInputs
from vmupdate_agent.target import BinaryFacts, DryRunFacts, ProbeFacts

NEW = "/usr/lib/qemu-new/bin/qemu-system-x86_64"
ALLOWED = ("/usr/lib/qemu-new",)
GUARD = "/run/vmupdate/bin/vmupdate-cpr-guard"

Edit = Callable[[PreflightInputs], PreflightInputs]
VmLoader = Callable[[str], VMInfo]
BASE = "raw-sid-11.1.3-memfd"


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
