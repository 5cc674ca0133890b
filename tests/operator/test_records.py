"""A fleet's records: the VMUpdate's status stays bounded whatever the fleet; each host's
VMUpdateHost holds its VMs, and a change is a patch of the VMs that changed."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.operator.builders import NEW_VERSION, T0, spec
from vmupdate_api.crd.conditions import Reason
from vmupdate_api.crd.constants import (
    LABEL_FAILED,
    LABEL_HOST,
    LABEL_VMUPDATE,
    LABEL_VMUPDATE_UID,
    MAX_HISTORY,
    MAX_HOST_VMS,
    MAX_LISTED_VMS,
    MAX_MESSAGE,
    MAX_NAME,
)
from vmupdate_api.crd.vmupdate import (
    RolloutRecord,
    RolloutTarget,
    UpdatePhase,
    VMPhase,
    VMRolloutStatus,
    VMUpdateStatus,
)
from vmupdate_api.crd.vmupdate_spec import CprMode
from vmupdate_api.crd.vmupdatehost import VMUpdateHost
from vmupdate_operator import records
from vmupdate_operator.planning import Halt, Plan
from vmupdate_operator.status import build_status

UID = "5f0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"
BOUND = 256 * 1024  # the VMUpdate's status, whatever the fleet
ETCD_LIMIT = 1536 * 1024  # etcd's default request size limit


def worst_row(h: int, v: int, phase: VMPhase) -> VMRolloutStatus:
    """A record with every field at its longest (names and message at their bounds)."""
    host = f"h{h:06d}".ljust(MAX_NAME, "x")
    name = f"v{v:06d}".ljust(MAX_NAME, "y")
    return VMRolloutStatus(
        host=host, name=name, uuid="1" * 36, from_version="9" * 64, to_version="9" * 64,
        pid_before=2**31, pid_after=2**31, mode=CprMode.CPR_TRANSFER, pause_ms=123456.789012,
        phase=phase, message="m" * MAX_MESSAGE, operation_id="o" * 128, started_at=T0,
        finished_at=T0)


def fleet(vms: int, per_host: int = 20) -> list[VMRolloutStatus]:
    """Half failed, the rest in flight: the most every list and condition can name."""
    phases = (VMPhase.FAILED, VMPhase.UPDATING, VMPhase.ROLLED_BACK, VMPhase.PREFLIGHT)
    return [worst_row(i // per_host, i % per_host, phases[i % 4]) for i in range(vms)]


@pytest.mark.parametrize("vms", [20_000, 100_000])
def test_the_vmupdate_status_is_bounded_whatever_the_fleet(vms: int) -> None:
    rows = fleet(vms)
    the_spec = spec(target={"binary": "/" + "b" * 1023, "version": NEW_VERSION})
    history = [RolloutRecord(generation=g, target=RolloutTarget(binary="/" + "b" * 1023,
                                                                version="9" * 64),
                             phase=UpdatePhase.FAILED, start_time=T0, finish_time=T0,
                             targets=vms, updated=vms, failed=vms, skipped=vms, blocked=vms,
                             pause_max_ms=1e9)
               for g in range(MAX_HISTORY)]
    previous = VMUpdateStatus(observed_generation=MAX_HISTORY + 1, history=history)
    plan = Plan(rows=tuple(rows), started=(), canary_active=False,
                halt=Halt(Reason.FAILURE_LIMIT_EXCEEDED, "h" * MAX_MESSAGE),
                waiting=("w" * MAX_MESSAGE,) * 10, dropped=0)
    status = build_status(previous=previous, spec=the_spec, generation=MAX_HISTORY + 2,
                          plan=plan, now=T0 + timedelta(seconds=1))
    size = len(json.dumps(status.to_wire(), separators=(",", ":")).encode())
    assert size < BOUND, size
    assert status.targets == vms and status.failed == vms // 2
    assert status.in_progress == vms // 2 and status.hosts == vms // 20
    assert len(status.failed_vms) == len(status.in_progress_vms) == MAX_LISTED_VMS
    assert len(status.history) == MAX_HISTORY
    # It validates as the API server's schema would (bounded lists, message lengths).
    assert VMUpdateStatus.model_validate(status.to_wire()).to_wire() == status.to_wire()


def test_a_host_record_at_its_largest_fits_in_etcd() -> None:
    rows = {r.name: r for r in fleet(MAX_HOST_VMS, per_host=MAX_HOST_VMS)}
    host = next(iter(rows.values())).host
    body = records.new_record("u" * MAX_NAME, UID, host, rows)
    size = len(json.dumps(body, separators=(",", ":")).encode())
    assert size < ETCD_LIMIT, size
    VMUpdateHost.model_validate(body)
    assert len(body["metadata"]["name"]) <= MAX_NAME


def test_names_and_labels() -> None:
    assert records.record_name("fleet", UID, "node-a") == "fleet.5f0c6a3e.node-a"
    long = records.record_name("u" * MAX_NAME, UID, "h" * MAX_NAME)
    assert len(long) <= MAX_NAME and long != records.record_name("u" * MAX_NAME, UID, "h")
    assert records.record_name("u" * 200, UID, "node-a.example") != records.record_name(
        "u" * 200, "6" + UID[1:], "node-a.example")  # a recreated VMUpdate: other objects
    short = records.labels("fleet", UID, "node-a", failed=True)
    assert short == {LABEL_VMUPDATE: "fleet", LABEL_VMUPDATE_UID: UID, LABEL_HOST: "node-a",
                     LABEL_FAILED: "true"}
    longer = records.labels("u" * 64, UID, "h" * 64, failed=False)
    assert longer == {LABEL_VMUPDATE: None, LABEL_VMUPDATE_UID: UID, LABEL_HOST: None,
                      LABEL_FAILED: None}


def row(name: str, phase: VMPhase, message: str | None = None) -> VMRolloutStatus:
    return VMRolloutStatus(host="a", name=name, phase=phase, message=message)


def test_a_new_record_holds_every_vm_with_its_counts_and_owner() -> None:
    rows = {"x": row("x", VMPhase.UPDATED), "y": row("y", VMPhase.FAILED, "agent said no"),
            "z": row("z", VMPhase.UPDATING)}
    body = records.new_record("fleet", UID, "a", rows)
    obj = VMUpdateHost.model_validate(body)
    assert obj.spec.vm_update == "fleet" and obj.spec.host == "a"
    assert obj.status is not None and set(obj.status.vms) == {"x", "y", "z"}
    assert (obj.status.targets, obj.status.updated, obj.status.in_progress,
            obj.status.failed) == (3, 1, 1, 1)
    assert obj.status.failures == "y: agent said no"
    assert body["metadata"]["labels"][LABEL_FAILED] == "true"
    [owner] = body["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "VMUpdate", "fleet", UID, True)


def test_a_patch_carries_only_the_vms_that_changed() -> None:
    before = {n: row(n, VMPhase.PENDING) for n in ("w", "x", "y")}
    assert records.record_patch("fleet", UID, "a", before, dict(before)) is None
    after = {**before, "x": row("x", VMPhase.UPDATING).model_copy(
        update={"operation_id": "op-x"})}
    del after["w"]
    patch = records.record_patch("fleet", UID, "a", before, after)
    assert patch is not None and set(patch["status"]["vms"]) == {"w", "x"}
    assert patch["status"]["vms"]["w"] is None
    x = patch["status"]["vms"]["x"]
    assert x["operationId"] == "op-x" and x["phase"] == "Updating"
    assert x["pauseMs"] is None  # unset fields are removed by the merge patch
    assert patch["status"]["inProgress"] == 1 and patch["status"]["failures"] is None
    assert "metadata" not in patch  # no failure came or went
    failed = {**after, "y": row("y", VMPhase.FAILED, "bad")}
    patch = records.record_patch("fleet", UID, "a", after, failed)
    assert patch is not None and patch["metadata"] == {"labels": {LABEL_FAILED: "true"}}
    assert patch["status"]["failures"] == "y: bad" and set(patch["status"]["vms"]) == {"y"}
    fixed = {**failed, "y": row("y", VMPhase.UPDATED)}
    patch = records.record_patch("fleet", UID, "a", failed, fixed)
    assert patch is not None and patch["metadata"] == {"labels": {LABEL_FAILED: None}}


def test_failures_are_cut_to_the_column() -> None:
    rows = {f"v{i}": row(f"v{i}", VMPhase.FAILED, "e" * 300) for i in range(10)}
    status = VMUpdateHost.model_validate(records.new_record("fleet", UID, "a", rows)).status
    assert status is not None and status.failures is not None
    assert len(status.failures) == MAX_MESSAGE and status.failures.endswith("…")


def test_by_host_groups_rows() -> None:
    rows = [row("x", VMPhase.PENDING), row("y", VMPhase.PENDING),
            VMRolloutStatus(host="b", name="x")]
    grouped = records.by_host(rows)
    assert {h: sorted(v) for h, v in grouped.items()} == {"a": ["x", "y"], "b": ["x"]}


def test_a_record_read_back_keeps_only_consistent_rows() -> None:
    record = records.record_from_body({
        "spec": {"vmUpdate": "fleet", "vmUpdateUid": UID, "host": "a"},
        "status": {"vms": {
            "x": {"host": "a", "name": "x", "phase": "Updated"},
            "y": {"host": "b", "name": "y", "phase": "Updated"},  # another host's: not ours
            "z": {"host": "a", "name": "other", "phase": "Updated"},  # key and name differ
            "w": {"host": "a", "name": "w", "pidBefore": -1},  # does not validate
        }}})
    assert record is not None and [r.name for r in record.rows()] == ["x"]
    assert records.record_from_body({"spec": {"vmUpdate": "f", "vmUpdateUid": UID,
                                              "host": "a"}, "status": {"vms": []}}) is not None
