"""The operator end to end: a real kube-apiserver, the operator process, two simulated nodes
(an agent and a VMHost registrar each) with real QEMU VMs, driven with `kubectl apply` of the
examples shipped in examples/ (spec.target pointed at the rig's QEMU).

The rig's VMs run the sid QEMU 11.1.3 at /usr/bin/qemu-system-x86_64 (inside its root); the
target is the same QEMU through another path (a hard link), so "the new version" here is the
new binary -- cpr-exec needs QEMU >= 10.2 on both sides, which the rig has only in sid.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster.fixtures import Kubectl
from e2e.k8s import kube
from e2e.k8s.fixtures import ACTIVE_PRIORITY, Placement
from e2e.k8s.nodes import Fleet
from e2e.k8s.operator_process import HOST_STALE_AFTER_S, PEERING_LIFETIME_S, OperatorProcess
from e2e.rig import Rig
from e2e.rig.vm import target_path
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentClient, ClientTls

pytestmark = [pytest.mark.k8s, pytest.mark.qemu]

ROLLOUT_TIMEOUT = 180


def target(rig: Rig) -> dict[str, str]:
    assert rig.sid.alt_binary is not None
    return {"target_binary": rig.sid.alt_binary, "target_version": rig.sid.version}


def vmupdate(kubectl: Kubectl, name: str) -> Any:
    return kube.get(kubectl, "vmupdate", name)


def ready(kubectl: Kubectl, name: str) -> Any:
    obj = vmupdate(kubectl, name)
    if kube.condition(obj, "Ready").get("status") == "True" and (
            obj["status"].get("observedGeneration") == obj["metadata"]["generation"]):
        return obj
    return None


async def wait_ready(kubectl: Kubectl, name: str, operator: OperatorProcess,
                     timeout: float = ROLLOUT_TIMEOUT) -> Any:
    return await kube.wait_for(
        lambda: ready(kubectl, name), timeout, f"VMUpdate {name} to be Ready",
        describe=lambda: f"{vmupdate(kubectl, name)}\n{operator.log()[-6000:]}")


def assert_all_updated(kubectl: Kubectl, obj: Any, placement: Placement, rig: Rig,
                       pids: dict[str, int]) -> None:
    rows = kube.rows(kubectl, obj)
    assert set(rows) == set(placement.vms)
    for name, vm in placement.vms.items():
        row = rows[name]
        assert row["phase"] == "Updated", row
        assert row["host"] == placement.hosts[name]
        assert row["uuid"] == vm.uuid
        assert row["mode"] == "CprExec"
        assert row["pidBefore"] == row["pidAfter"] == pids[name] == vm.pid, row
        assert row["fromVersion"] == row["toVersion"] == rig.sid.version
        assert row["pauseMs"] >= 0 and row["operationId"].startswith("vmu-")
        # The process runs the target binary now (same pid: cpr-exec).
        assert target_path(vm.pid) == rig.sid.alt_binary


async def test_three_vms_on_two_hosts_converge(vmupdates: Kubectl, three_vms: Placement,
                                               rig: Rig, fleet: Fleet,
                                               operator_process: OperatorProcess) -> None:
    kubectl = vmupdates
    pids = {name: vm.pid for name, vm in three_vms.vms.items()}
    known = {op for journal in fleet.journals().values() for op in journal}
    mark = time.monotonic_ns()
    manifest, _ = kube.example("vmupdate-two-hosts.yaml", **target(rig))
    kube.apply(kubectl, manifest)

    obj = await wait_ready(kubectl, "two-hosts", operator_process)

    status = obj["status"]
    assert status["phase"] == "Succeeded"
    assert (status["targets"], status["updated"], status["failed"]) == (3, 3, 0)
    assert status["startTime"] and status["pauseMaxMs"] >= status["pauseP50Ms"] >= 0
    assert kube.condition(obj, "Progressing")["status"] == "False"
    assert kube.condition(obj, "Degraded")["reason"] == "NoFailures"
    assert_all_updated(kubectl, obj, three_vms, rig, pids)
    # The canary (the first VM in host, name order: db-01 on node-a) went alone: it had
    # finished before the others started.
    rows = kube.rows(kubectl, obj)
    assert rows["db-01"]["finishedAt"] <= min(rows["web-01"]["startedAt"],
                                              rows["web-02"]["startedAt"]), rows
    for vm in three_vms.vms.values():
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous(since=mark)
    # One agent operation per VM, journaled on the VM's own node.
    journals = fleet.journals()
    for row in rows.values():
        assert set(journals[row["host"]]) - known == {
            r["operationId"] for r in rows.values() if r["host"] == row["host"]}

    # kubectl shows it: printer columns of both kinds.
    table = kubectl("get", "vmupdates", timeout=30).stdout
    assert table.split()[:6] == ["NAME", "PHASE", "TARGETS", "UPDATED", "FAILED", "MAXPAUSEMS"]
    assert "two-hosts" in table and "Succeeded" in table
    columns = kubectl("get", "vmupdate", "two-hosts", "--no-headers", timeout=30).stdout.split()
    assert columns[1:5] == ["Succeeded", "3", "3", "0"]
    def host_table() -> Any:
        # NAME NODE VMS READY QEMU HEARTBEAT AGE ENDPOINT AGENT; a listing taken while the
        # last update still ran shows that VM busy (not ready): wait for the next heartbeat.
        out = kubectl("get", "vmhosts", "-o", "wide", "--no-headers", timeout=30).stdout
        lines = {line.split()[0]: line.split() for line in out.splitlines()}
        if (lines["node-a"][1:5] == ["node-a", "2", "2", rig.sid.version]
                and lines["node-b"][1:5] == ["node-b", "1", "1", rig.sid.version]):
            return lines
        return None

    lines = await kube.wait_for(host_table, 30, "both VMHosts to list their VMs ready",
                                describe=lambda: str(kube.get(kubectl, "vmhosts")))
    assert lines["node-a"][7] == fleet.node("node-a").endpoint
    # Events for each VM's start and finish, and Prometheus metrics.
    reasons = [e["reason"] for e in kube.events(kubectl, "two-hosts")]
    assert reasons.count("UpdateStarted") == 3 and reasons.count("VMUpdated") == 3, reasons
    assert "RolloutComplete" in reasons
    metrics = operator_process.metrics()
    assert 'vmupdate_vm_pause_seconds_count{mode="CprExec"}' in metrics
    assert 'vmupdate_vm_updates_total{outcome="updated"}' in metrics

    # Desired state: a VM that appears later is updated too.
    web03 = await three_vms.start("node-b", "web-03")
    await kube.wait_for(
        lambda: kube.rows(kubectl, vmupdate(kubectl, "two-hosts")).get("web-03"), 60,
                        "web-03 to be selected")
    obj = await wait_ready(kubectl, "two-hosts", operator_process)
    assert kube.rows(kubectl, obj)["web-03"]["phase"] == "Updated"
    assert target_path(web03.pid) == rig.sid.alt_binary
    web03.serial.assert_continuous()

    # Desired state: a VM put back on its old binary (here by a person calling its agent
    # directly) is updated again, under the next attempt's operation id.
    web01 = three_vms.vms["web-01"]
    first_op = kube.rows(kubectl, obj)["web-01"]["operationId"]
    await revert_to_old_binary(fleet, "node-a", web01.uuid, rig)
    assert target_path(web01.pid) == rig.sid.binary

    def updated_again() -> Any:
        o = ready(kubectl, "two-hosts")
        row = kube.rows(kubectl, o).get("web-01") if o else None
        # The records live in the host's VMUpdateHost, written apart from the VMUpdate's
        # status: wait for the new attempt's row itself to end.
        return o if row and row["operationId"] != first_op and row["phase"] in (
            "Updated", "Failed", "RolledBack") else None

    obj = await kube.wait_for(updated_again, ROLLOUT_TIMEOUT, "web-01 to be updated again")
    row = kube.rows(kubectl, obj)["web-01"]
    assert row["operationId"] == first_op.removesuffix("-a0") + "-a1"
    assert row["phase"] == "Updated" and row["pidAfter"] == pids["web-01"] == web01.pid
    assert target_path(web01.pid) == rig.sid.alt_binary
    web01.serial.assert_continuous(since=mark)
    reasons = [e["reason"] for e in kube.events(kubectl, "two-hosts")]
    assert "VMLeftTarget" in reasons


async def revert_to_old_binary(fleet: Fleet, node: str, vm_uuid: str, rig: Rig) -> None:
    """What a person with the operator's credentials could do with grpcurl."""
    pki = fleet.node(node).pki
    tls = ClientTls(ca_file=str(pki.ca_cert), cert_file=str(pki.operator.cert),
                    key_file=str(pki.operator.key))
    client = await AgentClient.connect(fleet.node(node).endpoint, tls)
    try:
        result = await client.update(pb.UpdateRequest(
            operation_id=f"manual-revert-{vm_uuid}", vm=vm_uuid, mode=pb.MODE_CPR_EXEC,
            target=pb.Target(binary=rig.sid.binary, expected_version=rig.sid.version)),
            timeout=120)
    finally:
        await client.close()
    assert result.outcome == pb.OUTCOME_UPDATED, result.message


async def test_dry_run_changes_nothing_and_reports_readiness(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess) -> None:
    kubectl = vmupdates
    before = {name: (vm.pid, target_path(vm.pid)) for name, vm in three_vms.vms.items()}
    journals = fleet.journals()
    manifest, _ = kube.example("vmupdate-two-hosts-dryrun.yaml", **target(rig))
    kube.apply(kubectl, manifest)

    obj = await wait_ready(kubectl, "two-hosts-preflight", operator_process)
    status = obj["status"]
    assert status["phase"] == "DryRunComplete"
    assert (status["targets"], status["dryRunPassed"], status["updated"]) == (3, 3, 0)
    assert "startTime" not in status  # nothing was started
    assert kube.condition(obj, "Ready")["reason"] == "DryRunPassed"
    for row in kube.rows(kubectl, obj).values():
        assert row["phase"] == "DryRunPassed", row
        assert row["mode"] == "CprExec" and "would use CprExec" in row["message"]
        assert "operationId" not in row
    assert status["hosts"] == 2 and not status.get("failedVMs")
    assert failed_hosts(kubectl, "two-hosts-preflight") == ""
    assert {n: (vm.pid, target_path(vm.pid)) for n, vm in three_vms.vms.items()} == before
    assert fleet.journals() == journals  # no agent operation

    # A wrong checksum: every preflight fails, and says which check and why.
    kube.patch_spec(kubectl, "two-hosts-preflight", {"target": {"sha256": "0" * 64}})

    def failed() -> Any:
        o = vmupdate(kubectl, "two-hosts-preflight")
        s = o.get("status") or {}
        return o if (s.get("observedGeneration") == 2 and s.get("phase") == "DryRunComplete"
                     ) else None

    obj = await kube.wait_for(failed, ROLLOUT_TIMEOUT, "the failing dry run")
    assert kube.condition(obj, "Ready")["status"] == "False"
    assert kube.condition(obj, "Ready")["reason"] == "DryRunFailed"
    assert kube.condition(obj, "Degraded")["status"] == "True"
    for row in kube.rows(kubectl, obj).values():
        assert row["phase"] == "DryRunFailed" and "sha256" in row["message"], row
    # Which VMs failed, and why: in the VMUpdate's status (the first 20), and in one
    # kubectl get of its hosts' records (every one).
    assert sorted(v["name"] for v in obj["status"]["failedVMs"]) == sorted(three_vms.vms)
    assert all("sha256" in v["message"] for v in obj["status"]["failedVMs"])
    table = failed_hosts(kubectl, "two-hosts-preflight")
    header, *lines = table.splitlines()
    assert header.split()[:7] == ["NAME", "VMUPDATE", "HOST", "VMS", "UPDATED", "INPROGRESS",
                                  "FAILED"], table
    assert header.split()[7] == "FAILURES" and len(lines) == 2, table
    for name in three_vms.vms:
        line = next(ln for ln in lines if f"{name}: " in ln)
        assert "sha256" in line.split(f"{name}: ", 1)[1], table
    by_field = kubectl("get", "vmupdatehosts", "--field-selector",
                       "spec.vmUpdate=two-hosts-preflight", "-o", "name", timeout=30)
    assert by_field.returncode == 0 and len(by_field.stdout.split()) == 2, by_field.stderr
    assert {n: (vm.pid, target_path(vm.pid)) for n, vm in three_vms.vms.items()} == before
    assert fleet.journals() == journals  # no agent operation


def failed_hosts(kubectl: Kubectl, name: str) -> str:
    """The command the operator's README gives for "which VMs failed, and why"."""
    res = kubectl("get", "vmupdatehosts", "-l",
                  f"vmupdate.dev/vmupdate={name},vmupdate.dev/failed=true", timeout=30)
    assert res.returncode == 0, res.stderr
    return str(res.stdout)


async def test_paused_holds_until_unpaused(vmupdates: Kubectl, three_vms: Placement, rig: Rig,
                                           fleet: Fleet,
                                           operator_process: OperatorProcess) -> None:
    kubectl = vmupdates
    journals = fleet.journals()
    manifest, _ = kube.example("vmupdate-two-hosts-paused.yaml", **target(rig))
    kube.apply(kubectl, manifest)

    def paused() -> Any:
        o = vmupdate(kubectl, "two-hosts-paused")
        return o if (o.get("status") or {}).get("phase") == "Paused" else None

    obj = await kube.wait_for(paused, 60, "phase Paused")
    assert obj["status"]["targets"] == 3 and obj["status"]["pending"] == 3
    assert kube.condition(obj, "Progressing")["reason"] == "RolloutPaused"
    await asyncio.sleep(8)  # several reconciles: still nothing may start
    obj = vmupdate(kubectl, "two-hosts-paused")
    assert obj["status"]["phase"] == "Paused"
    assert {r["phase"] for r in kube.rows(kubectl, obj).values()} == {"Pending"}
    assert all(r["message"] == "not started: spec.paused is true"
               for r in kube.rows(kubectl, obj).values())
    assert "startTime" not in obj["status"]
    assert fleet.journals() == journals

    kube.patch_spec(kubectl, "two-hosts-paused", {"paused": False})
    obj = await wait_ready(kubectl, "two-hosts-paused", operator_process)
    assert obj["status"]["updated"] == 3


async def test_operator_killed_mid_rollout_finishes_without_updating_twice(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess) -> None:
    kubectl = vmupdates
    pids = {name: vm.pid for name, vm in three_vms.vms.items()}
    known = {op for journal in fleet.journals().values() for op in journal}
    mark = time.monotonic_ns()
    manifest, _ = kube.example("vmupdate-two-hosts-serial.yaml", **target(rig))
    kube.apply(kubectl, manifest)

    def in_flight() -> Any:
        rows = kube.rows(kubectl, vmupdate(kubectl, "two-hosts-serial"))
        busy = [r for r in rows.values() if r["phase"] in ("Preflight", "Updating")]
        return busy if busy and len(rows) == 3 else None

    busy = await kube.wait_for(in_flight, 60, "a VM update in flight", interval=0.05)
    operator_process.kill()
    killed_at = vmupdate(kubectl, "two-hosts-serial")
    assert busy[0]["operationId"]
    # The agent goes on alone; give it the time to finish this VM without the operator.
    await asyncio.sleep(3)
    operator_process.start()

    obj = await wait_ready(kubectl, "two-hosts-serial", operator_process,
                           timeout=ROLLOUT_TIMEOUT + PEERING_LIFETIME_S)
    assert_all_updated(kubectl, obj, three_vms, rig, pids)
    rows = kube.rows(kubectl, obj)
    # The VM in flight at the kill kept its operation id: followed, not started again.
    assert rows[busy[0]["name"]]["operationId"] == busy[0]["operationId"]
    restarted_log = operator_process.log().split("--- operator run")[-1]
    assert f"following operation {busy[0]['operationId']}" in restarted_log
    # Every VM was updated by exactly one agent operation, and nothing else ran.
    journals = fleet.journals()
    ran = sorted(op for journal in journals.values() for op in journal if op not in known)
    assert ran == sorted(r["operationId"] for r in rows.values()), (ran, rows)
    for journal in journals.values():
        for op_id in ran:
            if op_id in journal:
                record = journal[op_id]
                assert record["state"] == "done", record
                assert record["result"]["outcome"] == "updated", record
    for vm in three_vms.vms.values():
        vm.serial.assert_continuous(since=mark)
    assert killed_at["status"].get("startTime") == obj["status"]["startTime"]


async def test_standby_replica_takes_over_when_the_active_one_dies(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess, tmp_path: Path) -> None:
    """Two replicas (kopf peering): the higher priority acts, the other stands by; when the
    active one is killed, the standby finishes the rollout."""
    kubectl = vmupdates
    pids = {name: vm.pid for name, vm in three_vms.vms.items()}
    known = {op for journal in fleet.journals().values() for op in journal}
    standby = OperatorProcess(operator_process.pki, tmp_path, priority=ACTIVE_PRIORITY - 1)
    standby.start()
    try:
        def both_peers() -> bool:
            peering = kube.get(kubectl, "clusterkopfpeering", "vmupdate") or {}
            return sorted(p.get("priority") for p in (peering.get("status") or {}).values()
                          ) == [ACTIVE_PRIORITY - 1, ACTIVE_PRIORITY]

        await kube.wait_for(both_peers, 60, "both replicas in the peering",
                            describe=standby.log)
        # An operator starts paused and resumes only when no live peer outranks it.
        assert "Resuming operations" not in standby.log()
        manifest, _ = kube.example("vmupdate-two-hosts-serial.yaml", **target(rig))
        kube.apply(kubectl, manifest)

        def in_flight() -> Any:
            rows = kube.rows(kubectl, vmupdate(kubectl, "two-hosts-serial"))
            return [r for r in rows.values() if r["phase"] in ("Preflight", "Updating")]

        await kube.wait_for(in_flight, 60, "a VM update in flight", interval=0.05)
        assert "following operation" not in standby.log()  # it did nothing so far
        operator_process.kill()

        obj = await wait_ready(kubectl, "two-hosts-serial", standby,
                               timeout=ROLLOUT_TIMEOUT + PEERING_LIFETIME_S)
        assert "Resuming operations after the pause" in standby.log()
        assert "following operation" in standby.log()
        assert_all_updated(kubectl, obj, three_vms, rig, pids)
        ran = sorted(op for j in fleet.journals().values() for op in j if op not in known)
        assert ran == sorted(r["operationId"] for r in kube.rows(kubectl, obj).values())
    finally:
        standby.stop()


async def test_a_host_with_a_stale_heartbeat_waits(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet,
        operator_process: OperatorProcess) -> None:
    """No heartbeat from node-b: `kubectl get vmhosts` shows its age, the operator updates
    node-a's VMs and holds node-b's until the agent reports again."""
    kubectl = vmupdates
    node_b = fleet.node("node-b")
    node_b.stop_registrar()
    try:
        def stale() -> bool:
            host = kube.get(kubectl, "vmhost", "node-b")
            beat = datetime.fromisoformat(host["status"]["heartbeatTime"].replace("Z", "+00:00"))
            return (datetime.now(UTC) - beat).total_seconds() > HOST_STALE_AFTER_S + 2

        await kube.wait_for(stale, HOST_STALE_AFTER_S + 30, "node-b's heartbeat to go stale")
        table = kubectl("get", "vmhosts", "--no-headers", timeout=30).stdout
        heartbeat_age = {ln.split()[0]: ln.split()[5] for ln in table.splitlines()}
        assert heartbeat_age["node-b"].endswith("s") and int(heartbeat_age["node-b"][:-1]) > 20

        manifest, _ = kube.example("vmupdate-two-hosts.yaml", **target(rig))
        kube.apply(kubectl, manifest)

        def node_a_done() -> Any:
            obj = vmupdate(kubectl, "two-hosts")
            rows = kube.rows(kubectl, obj)
            if len(rows) == 3 and rows["web-01"]["phase"] == rows["db-01"]["phase"] == "Updated":
                return obj
            return None

        obj = await kube.wait_for(node_a_done, ROLLOUT_TIMEOUT, "node-a's VMs to be updated")
        await asyncio.sleep(4)  # a few reconciles more: node-b's VM still waits
        obj = vmupdate(kubectl, "two-hosts")
        web02 = kube.rows(kubectl, obj)["web-02"]
        assert web02["phase"] == "Pending"
        assert web02["message"].startswith("host node-b unavailable: no agent heartbeat since")
        assert obj["status"]["phase"] == "Progressing"
        assert kube.condition(obj, "Ready")["status"] == "False"
        assert "waiting: host node-b unavailable" in kube.condition(obj, "Progressing")["message"]
        assert "operationId" not in web02  # never requested from its agent
    finally:
        node_b.start_registrar()

    obj = await wait_ready(kubectl, "two-hosts", operator_process)
    assert kube.rows(kubectl, obj)["web-02"]["phase"] == "Updated"


async def test_deleting_waits_for_the_running_update(
        vmupdates: Kubectl, three_vms: Placement, rig: Rig, fleet: Fleet) -> None:
    """The finalizer holds a deleted VMUpdate until the update it started has finished;
    nothing new starts meanwhile."""
    kubectl = vmupdates
    known = {op for journal in fleet.journals().values() for op in journal}
    manifest, _ = kube.example("vmupdate-two-hosts-serial.yaml", **target(rig))
    kube.apply(kubectl, manifest)

    def in_flight() -> Any:
        rows = kube.rows(kubectl, vmupdate(kubectl, "two-hosts-serial"))
        return [r for r in rows.values() if r["phase"] in ("Preflight", "Updating")]

    await kube.wait_for(in_flight, 60, "a VM update in flight", interval=0.05)
    kubectl("delete", "vmupdate", "two-hosts-serial", "--wait=false", timeout=30)
    held = vmupdate(kubectl, "two-hosts-serial")
    assert held is not None and held["metadata"].get("deletionTimestamp")
    assert "vmupdate.dev/finalizer" in held["metadata"]["finalizers"]

    def gone_with_journals() -> Any:
        journals = fleet.journals()  # read before the check: no newer than the object's end
        return journals if vmupdate(kubectl, "two-hosts-serial") is None else None

    journals = await kube.wait_for(gone_with_journals, ROLLOUT_TIMEOUT, "the VMUpdate to go")
    started = {op: rec for j in journals.values() for op, rec in j.items() if op not in known}
    assert 1 <= len(started) < 3, started  # the running one (not the whole rollout)
    assert all(rec["state"] == "done" for rec in started.values()), started
    await asyncio.sleep(3)
    assert {op for j in fleet.journals().values() for op in j if op not in known} == set(started)
    assert kube.get(kubectl, "vmupdatehosts") == []  # its records went with it
