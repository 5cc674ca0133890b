"""The VMUpdateHost object: a VMUpdate's record of each selected VM on one host (owned by the
VMUpdate, written by the operator), so that the VMUpdate's own status stays bounded whatever
the fleet.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from vmupdate_api.crd.constants import API_VERSION, KIND_VMUPDATEHOST, MAX_HOST_VMS, MAX_MESSAGE
from vmupdate_api.crd.meta import K8sModel, Message, Name, ObjectMeta
from vmupdate_api.crd.vmupdate import (
    FAILED_VM_PHASES,
    IN_PROGRESS_VM_PHASES,
    VMPhase,
    VMRolloutStatus,
)


class VMUpdateHostSpec(K8sModel):
    """Which VMUpdate and host the records are of (set at creation)."""

    vm_update: Name
    """Name of the VMUpdate (also its owner reference)."""
    vm_update_uid: Annotated[str, StringConstraints(max_length=64)]
    """metadata.uid of that VMUpdate."""
    host: Name
    """The VMHost (node) whose VMs these are."""


class VMUpdateHostStatus(K8sModel):
    """The VMUpdate's record of each selected VM on one host, written by the operator."""

    vms: Annotated[dict[str, VMRolloutStatus], Field(
        max_length=MAX_HOST_VMS, json_schema_extra={"x-kubernetes-map-type": "atomic"})] = Field(
        default_factory=dict)
    """One record per selected VM of the host, by VM name (a map, so that the operator's
    merge patch carries only the VMs that changed; atomic for field management, which then
    tracks one field rather than every field of every record -- one writer owns them)."""
    targets: Annotated[int, Field(ge=0)] = 0
    """Selected VMs on this host."""
    updated: Annotated[int, Field(ge=0)] = 0
    """VMs running the target."""
    in_progress: Annotated[int, Field(ge=0)] = 0
    """VMs in preflight or being updated."""
    failed: Annotated[int, Field(ge=0)] = 0
    """VMs that failed, rolled back, or failed a dry-run preflight."""
    failures: Message | None = None
    """The failed VMs and why, for kubectl get: "NAME: MESSAGE; ..." (cut at 1024
    characters; each record has the whole message)."""

    def summarize(self) -> VMUpdateHostStatus:
        """A copy whose counts and failures are computed from ``vms``."""
        rows = [self.vms[k] for k in sorted(self.vms)]
        failed = [r for r in rows if r.phase in FAILED_VM_PHASES]
        text = "; ".join(f"{r.name}: {r.message or r.phase.value}" for r in failed)
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 1] + "\u2026"
        return self.model_copy(update={
            "targets": len(rows),
            "updated": sum(r.phase == VMPhase.UPDATED for r in rows),
            "in_progress": sum(r.phase in IN_PROGRESS_VM_PHASES for r in rows),
            "failed": len(failed),
            "failures": text or None,
        })


class VMUpdateHost(K8sModel):
    """A VMUpdate's per-VM records on one host (owned by the VMUpdate, written by the
    operator): the VMUpdate's own status keeps only counts and a bounded list of VMs."""

    api_version: Literal["vmupdate.dev/v1alpha1"] = API_VERSION
    kind: Literal["VMUpdateHost"] = KIND_VMUPDATEHOST
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VMUpdateHostSpec
    status: VMUpdateHostStatus | None = None
