"""The VMHost object: one per node, written by that node's agent -- the agent's endpoint, the
QEMU binaries on the host, one row per VM and the agent's health.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from vmupdate_api.crd.conditions import CONDITIONS_LIST, Condition
from vmupdate_api.crd.constants import API_VERSION, KIND_VMHOST, MAX_HOST_VMS, MAX_MESSAGE, MAX_NAME
from vmupdate_api.crd.meta import K8sModel, Message, Name, ObjectMeta, Path, Time, VersionString
from vmupdate_api.crd.rules import ENDPOINT_RE, NODE_NAME_RULE, Rule, Validations
from vmupdate_api.crd.vmupdate_spec import CprMode


class QemuBinary(K8sModel):
    """A QEMU binary the agent found on the host."""

    path: Path
    """Absolute path."""
    version: VersionString | None = None
    """Version it reports (MAJOR.MINOR.MICRO)."""


class HostVM(K8sModel):
    """A VM the agent found on the host."""

    name: Name
    """VM name (QEMU's -name, else the QMP socket's file name); unique on the host."""
    uuid: Annotated[str, StringConstraints(max_length=36)] | None = None
    """QEMU's VM UUID."""
    pid: Annotated[int, Field(ge=1)] | None = None
    """QEMU process id."""
    qemu_version: VersionString | None = None
    """Version of the running QEMU."""
    binary: Path | None = None
    """Binary the QEMU process runs."""
    machine_type: Annotated[str, StringConstraints(max_length=128)] | None = None
    """Machine type, e.g. pc-q35-10.0."""
    memory_mib: Annotated[int, Field(ge=0)] | None = None
    """Guest RAM in MiB."""
    runstate: Annotated[str, StringConstraints(max_length=32)] | None = None
    """QEMU run state, e.g. running, paused."""
    cpr_modes: Annotated[list[CprMode], Field(max_length=3)] = Field(default_factory=list)
    """CPR modes this VM's QEMU supports."""
    ready: bool = False
    """True when the VM can be updated in place now."""
    not_ready_reasons: Annotated[list[Message], Field(max_length=32)] = Field(default_factory=list)
    """Why not, one reason per entry, e.g. "memory backend ram0 has share=off"."""


class VMHostSpec(K8sModel):
    """Identity of the VMHost."""

    node_name: Annotated[
        str, StringConstraints(max_length=MAX_NAME), Validations((NODE_NAME_RULE,))
    ]
    """The node this VMHost describes; equals metadata.name."""


class VMHostStatus(K8sModel):
    """Inventory and health, written by the node's agent."""

    endpoint: Annotated[str, StringConstraints(max_length=270, pattern=ENDPOINT_RE)] | None = None
    """Agent gRPC endpoint, host:port."""
    agent_version: VersionString | None = None
    """Agent version."""
    heartbeat_time: Time | None = None
    """Last time the agent refreshed this object."""
    qemu_binaries: Annotated[list[QemuBinary], Field(max_length=32)] = Field(default_factory=list)
    """QEMU binaries found on the host."""
    vms: Annotated[list[HostVM], Field(max_length=MAX_HOST_VMS)] = Field(default_factory=list)
    """VMs found on the host."""
    vm_count: Annotated[int, Field(ge=0)] = 0
    """Number of VMs (rows in vms)."""
    ready_count: Annotated[int, Field(ge=0)] = 0
    """VMs that can be updated in place now."""
    qemu_versions: Annotated[str, StringConstraints(max_length=MAX_MESSAGE)] | None = None
    """Distinct QEMU versions the VMs run, sorted, comma-separated (for kubectl get)."""
    conditions: Annotated[
        list[Condition], Field(max_length=16, json_schema_extra=CONDITIONS_LIST)
    ] = Field(default_factory=list)
    """Ready: the agent is serving and its inventory is fresh."""

    def summarize(self) -> VMHostStatus:
        """A copy whose vmCount, readyCount and qemuVersions are computed from ``vms``."""
        versions = sorted({vm.qemu_version for vm in self.vms if vm.qemu_version}, key=_version_key)
        return self.model_copy(
            update={
                "vm_count": len(self.vms),
                "ready_count": sum(vm.ready for vm in self.vms),
                "qemu_versions": ",".join(versions) if versions else None,
            }
        )


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in version.split("."))


class VMHost(K8sModel):
    """QEMU inventory of one node, kept by that node's vmupdate agent."""

    __k8s_rules__ = (
        Rule(
            cel="self.metadata.name == self.spec.nodeName",
            message="VMHost metadata.name must equal spec.nodeName: name each VMHost after "
            "its node",
            check=lambda h: h.metadata.name is None or h.metadata.name == h.spec.node_name,
            field_path=".spec.nodeName",
        ),
    )

    api_version: Literal["vmupdate.dev/v1alpha1"] = API_VERSION
    kind: Literal["VMHost"] = KIND_VMHOST
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VMHostSpec
    status: VMHostStatus | None = None
