"""The agent's VMHost registration: the status built from a listing (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from vmupdate_agent import registration as reg
from vmupdate_api.crd.meta import status_merge_patch
from vmupdate_api.crd.vmhost import VMHost, VMHostStatus
from vmupdate_api.crd.vmupdate_spec import CprMode
from vmupdate_api.gen import agent_v1_pb2 as pb

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = reg.RegistrationSettings(node_name="node-a", endpoint="127.0.0.1:9443",
                                    agent_version="0.1.0", labels={"zone": "1"})


def pb_vm(name: str, *, major: int = 10, minor: int = 0, micro: int = 2,
          binary: str = "/usr/bin/qemu-system-x86_64", ready: bool = True,
          reasons: tuple[str, ...] = (), busy: str = "") -> pb.VM:
    return pb.VM(name=name, uuid=f"00000000-0000-4000-8000-{name.encode().hex()[:12]:0<12}",
                 pid=100, binary=binary, qmp_path=f"/run/{name}/qmp.sock",
                 version=pb.QemuVersion(major=major, minor=minor, micro=micro),
                 machine_type="pc-q35-10.0", memory_bytes=256 << 20, runstate="running",
                 readiness=pb.Readiness(ready=ready, reasons=reasons,
                                        modes=[pb.MODE_CPR_EXEC, pb.MODE_CPR_TRANSFER]),
                 busy_operation_id=busy)


def test_host_vm() -> None:
    vm = reg.host_vm(pb_vm("web-01"))
    assert (vm.name, vm.qemu_version, vm.memory_mib, vm.machine_type, vm.runstate, vm.ready) == (
        "web-01", "10.0.2", 256, "pc-q35-10.0", "running", True)
    assert vm.cpr_modes == [CprMode.CPR_EXEC, CprMode.CPR_TRANSFER]


def test_busy_vm_is_not_ready_and_says_why() -> None:
    vm = reg.host_vm(pb_vm("web-01", busy="vmu-op"))
    assert not vm.ready and vm.not_ready_reasons[0] == "busy: operation vmu-op runs on it"


def test_not_ready_reasons_are_kept() -> None:
    vm = reg.host_vm(pb_vm("db", ready=False, reasons=("memory backend ram0 has share=off",)))
    assert not vm.ready and vm.not_ready_reasons == ["memory backend ram0 has share=off"]


def test_host_status_summarizes() -> None:
    listing = pb.ListVMsResponse(vms=[
        pb_vm("a"), pb_vm("b", major=11, minor=1, micro=3, binary="/opt/q11"),
        pb_vm("c", ready=False)],
        unreachable=[pb.UnreachableSocket(qmp_path="/run/x/qmp.sock", error="refused")])
    status = reg.host_status(listing, SETTINGS, T0, [])
    assert (status.vm_count, status.ready_count, status.qemu_versions) == (3, 2, "10.0.2,11.1.3")
    assert [(b.path, b.version) for b in status.qemu_binaries] == [
        ("/opt/q11", "11.1.3"), ("/usr/bin/qemu-system-x86_64", "10.0.2")]
    assert (status.endpoint, status.agent_version, status.heartbeat_time) == (
        "127.0.0.1:9443", "0.1.0", T0)
    [ready] = status.conditions
    assert (ready.type, ready.status.value, ready.reason) == ("Ready", "True", "AgentReady")
    assert "3 VM(s), 2 ready" in ready.message and "refused" in ready.message
    # What the API server would store validates against the CRD model.
    VMHost.model_validate({**reg.vmhost_object(SETTINGS), "status": status.to_wire()})


def test_transition_time_is_kept_across_heartbeats() -> None:
    first = reg.host_status(pb.ListVMsResponse(), SETTINGS, T0, [])
    later = T0 + timedelta(seconds=10)
    second = reg.host_status(pb.ListVMsResponse(), SETTINGS, later, first.conditions)
    assert second.conditions[0].last_transition_time == T0
    failed = reg.failed_conditions(second.conditions, "timeout", later)
    assert (failed[0].status.value, failed[0].reason) == ("False", "AgentNotReady")
    assert failed[0].last_transition_time == later and "timeout" in failed[0].message


def test_object_and_patch() -> None:
    obj = reg.vmhost_object(SETTINGS)
    assert obj["metadata"] == {"name": "node-a", "labels": {"zone": "1"}}
    assert obj["spec"] == {"nodeName": "node-a"}
    patch = status_merge_patch(VMHostStatus())
    assert patch["status"]["endpoint"] is None and patch["status"]["vms"] == []


def test_unknown_version_is_absent() -> None:
    assert reg.version_text(pb.QemuVersion()) is None
