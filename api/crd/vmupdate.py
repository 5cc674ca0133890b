"""The VMUpdate object and what the operator reports in it: the rollout's phase, one row per
selected VM, the earlier rollouts and the counts (the spec is in :mod:`vmupdate_spec`).

Phases and conditions of a VMUpdate (written by the operator only):

=============== ======================================================= ===== =========== ========
phase           meaning                                                 Ready Progressing Degraded
=============== ======================================================= ===== =========== ========
Pending         accepted, not yet looked at by the operator             -     -           -
Planning        resolving the selector against the VMHost inventories   False True        False
Progressing     VM updates running or queued                            False True        any
Paused          ``spec.paused``: no new VM is started                   False False       any
Succeeded       every selected VM runs ``spec.target`` (or none match)  True  False       False
Degraded        nothing left to do, but some VMs failed (within policy) False False       True
                or belong to another VMUpdate (Blocked)
Failed          halted: failures over policy, canary failed, or a VM    False False       True
                paused longer than ``pauseBudgetMs``
DryRunComplete  ``spec.dryRun``: preflight done on every selected VM    *     False       **
=============== ======================================================= ===== =========== ========

``*`` True when every preflight passed; ``**`` True when any preflight failed. "any" means
True once some VM failed while the rollout goes on. Precedence when several apply:
Failed > Paused > Planning/Progressing > Degraded > Succeeded. ``Succeeded`` is not final: a
VM that appears later moves the phase back to ``Progressing``. ``Failed`` is left by a spec
change (a new generation gets new operation ids, so failed VMs are tried again).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from vmupdate_api.crd.conditions import CONDITIONS_LIST, Condition
from vmupdate_api.crd.constants import (
    API_VERSION,
    KIND_VMUPDATE,
    MAX_HISTORY,
    MAX_LISTED_VMS,
    MAX_PATH,
)
from vmupdate_api.crd.meta import K8sModel, Message, Name, ObjectMeta, Time, VersionString
from vmupdate_api.crd.vmupdate_spec import CprMode, VMUpdateSpec


class UpdatePhase(StrEnum):
    """Rollout phase; see the module documentation for the table with the conditions."""

    PENDING = "Pending"
    PLANNING = "Planning"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    SUCCEEDED = "Succeeded"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    DRY_RUN_COMPLETE = "DryRunComplete"


class VMPhase(StrEnum):
    """Where one VM is.

    Pending: waiting for its turn. Preflight: the agent is checking it. Updating: CPR under
    way. Updated: runs the target (also when it already did: then no pidBefore). Failed:
    preflight or update failed (the VM keeps running its old QEMU, or its state is unknown;
    see message). RolledBack: the update failed and the agent resumed the VM on its old QEMU.
    Skipped: left the selection or disappeared (host gone, VM shut down) before it was
    updated; not a failure. Blocked: another VMUpdate owns the VM (the message names it; see
    the operator's one-owner rule); not a failure. DryRunPassed / DryRunFailed: preflight
    result of a dry run.
    """

    PENDING = "Pending"
    PREFLIGHT = "Preflight"
    UPDATING = "Updating"
    UPDATED = "Updated"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"
    SKIPPED = "Skipped"
    BLOCKED = "Blocked"
    DRY_RUN_PASSED = "DryRunPassed"
    DRY_RUN_FAILED = "DryRunFailed"


FAILED_VM_PHASES = frozenset({VMPhase.FAILED, VMPhase.ROLLED_BACK, VMPhase.DRY_RUN_FAILED})
IN_PROGRESS_VM_PHASES = frozenset({VMPhase.PREFLIGHT, VMPhase.UPDATING})


class VMRolloutStatus(K8sModel):
    """One selected VM in a rollout."""

    host: Name
    """Node the VM runs on."""
    name: Name
    """VM name as the node agent reports it (unique on its host)."""
    uuid: Annotated[str, StringConstraints(max_length=36)] | None = None
    """QEMU's VM UUID."""
    from_version: VersionString | None = None
    """QEMU version before the update."""
    to_version: VersionString | None = None
    """QEMU version after the update."""
    pid_before: Annotated[int, Field(ge=1)] | None = None
    """QEMU pid before the update."""
    pid_after: Annotated[int, Field(ge=1)] | None = None
    """QEMU pid after the update (the same for CprExec)."""
    mode: CprMode | None = None
    """CPR mode used."""
    pause_ms: Annotated[float, Field(ge=0)] | None = None
    """Guest pause in milliseconds (to the microsecond): QEMU's RESUME event time minus its
    STOP event time."""
    phase: VMPhase = VMPhase.PENDING
    """Pending, Preflight, Updating, Updated, Failed, RolledBack, Skipped, Blocked,
    DryRunPassed or DryRunFailed."""
    message: Message | None = None
    """Human-readable detail, e.g. the failed preflight check and its reason."""
    operation_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    """Agent operation id (from the VMUpdate uid, generation and VM uuid)."""
    started_at: Time | None = None
    """When the agent started on this VM."""
    finished_at: Time | None = None
    """When the agent finished with this VM."""


class RolloutTarget(K8sModel):
    """Binary and version of a rollout's target."""

    binary: Annotated[str, StringConstraints(max_length=MAX_PATH)]
    version: VersionString


class RolloutRecord(K8sModel):
    """One earlier rollout: what it was for and how it went, when it was superseded."""

    generation: Annotated[int, Field(ge=0)]
    """metadata.generation of the rollout."""
    target: RolloutTarget | None = None
    phase: UpdatePhase | None = None
    """Its phase when it was superseded."""
    start_time: Time | None = None
    """Its first real VM update."""
    finish_time: Time | None = None
    """When it completed, or else when it was superseded."""
    targets: Annotated[int, Field(ge=0)] = 0
    updated: Annotated[int, Field(ge=0)] = 0
    failed: Annotated[int, Field(ge=0)] = 0
    skipped: Annotated[int, Field(ge=0)] = 0
    blocked: Annotated[int, Field(ge=0)] = 0
    pause_max_ms: Annotated[float, Field(ge=0)] | None = None
    """Its longest guest pause."""


class VMRef(K8sModel):
    """One VM named in the VMUpdate's status (in flight, or failed): where it is and why."""

    host: Name
    name: Name
    phase: VMPhase
    operation_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    message: Message | None = None


class VMUpdateStatus(K8sModel):
    """Observed state, written by the operator only."""

    phase: UpdatePhase | None = None
    """Pending, Planning, Progressing, Paused, Succeeded, Degraded, Failed or DryRunComplete."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """metadata.generation the status reflects."""
    start_time: Time | None = None
    """When the current rollout (observedGeneration) requested its first real (not dry-run)
    VM update from an agent."""
    completion_time: Time | None = None
    """When the current rollout last reached Succeeded, Degraded, Failed or DryRunComplete."""
    target: RolloutTarget | None = None
    """The target of the current rollout (spec.target of observedGeneration)."""
    history: Annotated[list[RolloutRecord], Field(max_length=MAX_HISTORY)] = Field(
        default_factory=list)
    """Earlier rollouts of this object (one per superseded generation), oldest first, the last
    MAX_HISTORY of them."""
    conditions: Annotated[
        list[Condition], Field(max_length=16, json_schema_extra=CONDITIONS_LIST)
    ] = Field(default_factory=list)
    """Ready, Progressing and Degraded."""
    targets: Annotated[int, Field(ge=0)] = 0
    """Selected VMs (one record each in the VMUpdateHost objects)."""
    updated: Annotated[int, Field(ge=0)] = 0
    """VMs running the target."""
    pending: Annotated[int, Field(ge=0)] = 0
    """VMs waiting for their turn."""
    in_progress: Annotated[int, Field(ge=0)] = 0
    """VMs in preflight or being updated."""
    failed: Annotated[int, Field(ge=0)] = 0
    """VMs that failed, rolled back, or failed a dry-run preflight."""
    skipped: Annotated[int, Field(ge=0)] = 0
    """VMs that disappeared or left the selection before their update."""
    blocked: Annotated[int, Field(ge=0)] = 0
    """VMs another VMUpdate owns (rows Blocked)."""
    dry_run_passed: Annotated[int, Field(ge=0)] = 0
    """VMs that passed a dry-run preflight."""
    pause_p50_ms: Annotated[float, Field(ge=0)] | None = None
    """Median guest pause of the updated VMs (lower median)."""
    pause_max_ms: Annotated[float, Field(ge=0)] | None = None
    """Longest guest pause of the updated VMs."""
    hosts: Annotated[int, Field(ge=0)] = 0
    """Hosts with selected VMs: one VMUpdateHost object each holds their per-VM records
    (``kubectl get vmupdatehosts -l vmupdate.dev/vmupdate=NAME``)."""
    in_progress_vms: Annotated[list[VMRef], Field(max_length=MAX_LISTED_VMS)] = Field(
        default_factory=list)
    """VMs in preflight or being updated, the first MAX_LISTED_VMS by (host, name);
    inProgress counts them all."""
    failed_vms: Annotated[list[VMRef], Field(max_length=MAX_LISTED_VMS)] = Field(
        default_factory=list)
    """Failed VMs with the reason, the first MAX_LISTED_VMS by (host, name); failed counts
    them all."""

    def counted(self, rows: Sequence[VMRolloutStatus]) -> VMUpdateStatus:
        """A copy whose counts, pause statistics and VM lists are computed from ``rows``
        (every selected VM's record, in (host, name) order)."""
        phases = [row.phase for row in rows]
        pauses = [
            row.pause_ms
            for row in rows
            if row.phase == VMPhase.UPDATED and row.pause_ms is not None
        ]
        return self.model_copy(
            update={
                "targets": len(phases),
                "updated": phases.count(VMPhase.UPDATED),
                "pending": phases.count(VMPhase.PENDING),
                "in_progress": sum(p in IN_PROGRESS_VM_PHASES for p in phases),
                "failed": sum(p in FAILED_VM_PHASES for p in phases),
                "skipped": phases.count(VMPhase.SKIPPED),
                "blocked": phases.count(VMPhase.BLOCKED),
                "dry_run_passed": phases.count(VMPhase.DRY_RUN_PASSED),
                "pause_p50_ms": statistics.median_low(pauses) if pauses else None,
                "pause_max_ms": max(pauses) if pauses else None,
                "hosts": len({row.host for row in rows}),
                "in_progress_vms": _listed(rows, IN_PROGRESS_VM_PHASES),
                "failed_vms": _listed(rows, FAILED_VM_PHASES),
            }
        )


def _listed(rows: Sequence[VMRolloutStatus], phases: frozenset[VMPhase]) -> list[VMRef]:
    out: list[VMRef] = []
    for row in rows:
        if row.phase in phases:
            out.append(VMRef(host=row.host, name=row.name, phase=row.phase,
                             operation_id=row.operation_id, message=row.message))
            if len(out) == MAX_LISTED_VMS:
                break
    return out


class VMUpdate(K8sModel):
    """Update the QEMU under running VMs in place (QEMU CPR)."""

    api_version: Literal["vmupdate.dev/v1alpha1"] = API_VERSION
    kind: Literal["VMUpdate"] = KIND_VMUPDATE
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VMUpdateSpec
    status: VMUpdateStatus | None = None
