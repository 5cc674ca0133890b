"""A real node in the sandbox cluster (e2e/node): containerd + runc, the CNI bridge, kubelet,
kube-proxy and kube-scheduler, in a network namespace of its own.

* the node registers and becomes Ready (kubelet on this cgroup v1 machine, failCgroupV1: false);
* a pod of the project's image is scheduled, gets an address from the pod network, and reaches
  the API server through the ``kubernetes`` Service with in-cluster config, authenticated as
  its ServiceAccount;
* ``helm install`` as the README says (no Secret made beforehand: the chart makes its CA and
  client certificates, and the agent's sidecar gets its node's serving certificate from the
  operator through the CSR API) runs the operator Deployment (2 replicas, kopf peering,
  in-cluster config) and the agent DaemonSet (privileged, hostPID, hostPaths at the same
  paths) as pods of the built image;
* one VMUpdate applied with kubectl updates in place both a VM on the host and a VM in a pod
  (QEMU as an unprivileged container of the VM pod image, the target from a hostPath):
  cpr-exec, same pid, now the target binary; guest counter continuous, token unchanged, RAM
  checksums good.

Drills: the agent's container killed mid-update; the VM pod's container killed during a
rollout; ``helm upgrade`` during a rollout; a cordoned node. One module on purpose: they share
one node and one installed chart (module-scoped fixtures); the chart and VM pod helpers are in
``e2e/node/release.py`` and ``e2e/node/vmpod.py``.

The node is its own cluster's (a sandbox started here), so its scheduler never runs the other
tests' Pending pods. The node's host paths are made shared mounts first (see
``Node.share_host_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.sandbox import Sandbox, versions
from e2e.k8s import kube
from e2e.node.node import POD_CIDR, Node
from e2e.node.release import CHART, NAMESPACE, RELEASE, Installed, get, helm, install
from e2e.node.vmpod import VMPod, build_qemu_image
from e2e.rig import Rig, start_vm
from e2e.test_k8s_node_image import build_image

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Node, str]]:
    archive, image = build_image()
    qemu_archive, _ = build_qemu_image()
    # A cluster of its own: its scheduler and node must not run other tests' Pending pods.
    sandbox = Sandbox.start(tmp_path_factory.mktemp("node-k8s"))
    try:
        node = Node.start(sandbox, tmp_path_factory.mktemp("node"))
        try:
            node.import_image(archive)
            node.import_image(qemu_archive)
            yield sandbox, node, image
        finally:
            node.stop()
    finally:
        sandbox.stop()


def wait_pod_done(sandbox: Sandbox, ns: str, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pod = get(sandbox, "pod", "-n", ns, name)
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            return dict(pod)
        assert time.monotonic() < deadline, f"pod {ns}/{name} not done: {pod['status']}"
        time.sleep(0.5)


def test_node_is_ready(real_node: tuple[Sandbox, Node, str]) -> None:
    sandbox, node, _ = real_node
    obj = get(sandbox, "node", node.name)
    ready = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert ready["Ready"] == "True"
    info = obj["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert info["kubeletVersion"] == versions()["K8S_VERSION"]


IN_CLUSTER = """
import json, os
from kubernetes import client, config
config.load_incluster_config()
review = client.AuthenticationV1Api().create_self_subject_review(
    {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
result = {"host": os.environ["KUBERNETES_SERVICE_HOST"],
          "user": review.status.user_info.username}
open("/dev/termination-log", "w").write(json.dumps(result))
"""


def test_pod_gets_an_address_and_reaches_the_api_in_cluster(
        real_node: tuple[Sandbox, Node, str]) -> None:
    sandbox, node, image = real_node
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "in-cluster", "namespace": "default"},
           "spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                                    "command": ["python", "-c", IN_CLUSTER],
                                    "terminationMessagePolicy": "FallbackToLogsOnError"}]}}
    sandbox.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod), check=True)
    done = wait_pod_done(sandbox, "default", "in-cluster", 120)
    status = done["status"]
    assert done["spec"]["nodeName"] == node.name
    assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(POD_CIDR)
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert status["phase"] == "Succeeded", term.get("message")
    result = json.loads(term["message"])
    service_ip = get(sandbox, "service", "-n", "default", "kubernetes")["spec"]["clusterIP"]
    assert result == {"host": service_ip,
                      "user": "system:serviceaccount:default:default"}



# --------------------------------------------------------------------------- the chart


def exe_name(pid: int) -> str:
    """The name of the binary ``pid`` runs; an updated VM runs the agent's pinned private copy
    of the target, which may be unlinked since ("(deleted)")."""
    return Path(f"/proc/{pid}/exe").readlink().name.removesuffix(" (deleted)")


@pytest.fixture(scope="module")
def installed(real_node: tuple[Sandbox, Node, str], rig: Rig,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The chart installed as the README says, onto the real node, for the host's VMs."""
    sandbox, node, _ = real_node
    with install(sandbox, node, rig, tmp_path_factory.mktemp("chart")) as inst:
        yield inst


@pytest.fixture(scope="module")
def qemu_image() -> str:
    return build_qemu_image()[1]  # cached: imported by real_node


def test_chart_runs_its_pods_on_the_node(installed: Installed) -> None:
    deploy = get(installed.sandbox, "deployment", "-n", NAMESPACE, f"{RELEASE}-operator")
    assert deploy["status"].get("readyReplicas") == 2
    ds = get(installed.sandbox, "daemonset", "-n", NAMESPACE, f"{RELEASE}-agent")
    assert ds["status"]["numberReady"] == 1 == ds["status"]["desiredNumberScheduled"]
    pods = get(installed.sandbox, "pods", "-n", NAMESPACE)["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {installed.node.name}
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {"vmupdate:0.1.0"}
    args = [a for c in installed.agent_pod()["spec"]["containers"] for a in c.get("args", [])]
    # The per-node serving certificate's name: the chart's "{node}" resolved in the pod.
    assert "--server-name=$(NODE_NAME)" in args, args
    # The chart's defaults: the node's agent got its own certificate through the CSR API,
    # approved and signed by the chart's operator for the node its pod-bound token names.
    signed = [c for c in get(installed.sandbox, "csr")["items"]
              if c["spec"]["signerName"] == "vmupdate.dev/agent-serving"
              and (c.get("status") or {}).get("certificate")]
    assert {c["spec"]["extra"]["authentication.kubernetes.io/node-name"][0]
            for c in signed} == {installed.node.name}, signed


async def test_vmupdate_updates_a_host_vm_and_a_pod_vm_in_place(
        installed: Installed, rig: Rig, qemu_image: str) -> None:
    """One VMUpdate, applied with kubectl, updates a VM on the host (the rig's sid QEMU in
    its root) and a VM in a pod (the same QEMU build as the pod's image), both with cpr-exec
    to the target build, which the pod gets from a hostPath."""
    assert rig.sid.alt_binary is not None
    vm = await start_vm(rig, "sid", name="host-vm", workdir=installed.vm_workdir("host-vm"),
                        wait_ticking=True)
    pod: VMPod | None = None
    try:
        pod = await VMPod.start(installed.sandbox, installed.node, rig, name="pod-vm",
                                image=qemu_image, workdir=installed.vm_workdir("pod-vm"),
                                runtime_dir=installed.runtime_dir)
        assert Path(f"/proc/{pod.pid}/exe").readlink().name == Path(rig.sid.binary).name
        guests = {"host-vm": (vm.pid, vm.serial), "pod-vm": (pod.pid, pod.serial)}
        tokens = {n: serial.token for n, (_, serial) in guests.items()}
        await installed.wait_listed(vm.uuid, pod.uuid)
        mark = time.monotonic_ns()
        installed.apply_update("both", list(guests), rig.sid.alt_binary, rig.sid.version)
        obj = await installed.wait_update_ready("both")
        rows = kube.rows(installed.kubectl, obj)
        for name, (pid, serial) in guests.items():
            row = rows[name]
            assert row["phase"] == "Updated" and row["host"] == installed.node.name, row
            assert row["pidBefore"] == row["pidAfter"] == pid, row
            assert exe_name(pid) == Path(rig.sid.alt_binary).name
            await serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
            serial.assert_continuous(since=mark)
            assert serial.token == tokens[name]
        assert pod.phase() == "Running"
    finally:
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        if pod is not None:
            await pod.stop()
        await vm.stop()


# --------------------------------------------------------------------------- drills


async def test_vm_pod_killed_during_a_rollout(installed: Installed, rig: Rig,
                                              qemu_image: str) -> None:
    """The VM pod's container killed (SIGKILL to its QEMU) while the rollout updates it: the
    operator reports that VM as failed (or, killed before its turn, as no longer found),
    and goes on with the others (failurePolicy Continue): the host VM after it is updated."""
    assert rig.sid.alt_binary is not None
    # Rows run in (host, name) order, one at a time: the pod's VM first.
    vm = await start_vm(rig, "sid", name="b-host", workdir=installed.vm_workdir("b-host"),
                        wait_ticking=True)
    pod: VMPod | None = None
    ops = installed.state_dir / "operations"
    try:
        pod = await VMPod.start(installed.sandbox, installed.node, rig, name="a-pod",
                                image=qemu_image, workdir=installed.vm_workdir("a-pod"),
                                runtime_dir=installed.runtime_dir)
        await installed.wait_listed(vm.uuid, pod.uuid)
        qemu_pid, pid = pod.container_pid(), vm.pid
        assert qemu_pid == pod.pid  # QEMU is the container's process
        before = set(ops.glob("*.json"))
        mark = time.monotonic_ns()
        installed.apply_update("lost", ["a-pod", "b-host"], rig.sid.alt_binary,
                               rig.sid.version,
                               strategy={"maxParallel": 1, "failurePolicy": "Continue"})

        def pod_op() -> Path | None:
            for path in set(ops.glob("*.json")) - before:
                with contextlib.suppress(ValueError, OSError, KeyError):
                    if json.loads(path.read_text())["vm"]["uuid"] == pod.uuid:
                        return path
            return None

        record = await kube.wait_for(pod_op, 120, "the agent to journal a-pod's update",
                                     interval=0.01, describe=installed.logs)
        os.kill(qemu_pid, signal.SIGKILL)
        rows = await installed.wait_rows_end("lost", ["a-pod", "b-host"])
        journal = json.loads(record.read_text())
        print(f"VM pod killed: row {rows['a-pod']}, journal {journal['state']}")
        assert rows["a-pod"]["phase"] in ("Failed", "Skipped"), (rows["a-pod"], journal)
        assert rows["a-pod"]["message"], rows["a-pod"]
        assert rows["b-host"]["phase"] == "Updated", rows["b-host"]
        assert rows["b-host"]["pidAfter"] == pid == vm.pid
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous(since=mark)
        # restartPolicy Never: the kubelet does not boot it again.
        await kube.wait_for(lambda: pod.phase() == "Failed", 60, "the VM pod to be Failed")
    finally:
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        if pod is not None:
            await pod.stop()
        await vm.stop()

async def test_agent_killed_mid_update(installed: Installed, rig: Rig) -> None:
    """The agent's container killed (SIGKILL: no drain) while its journal holds the running
    operation: the kubelet restarts it, the new agent reads the journal on the hostPath and
    finishes or rolls back the operation, the operator follows it to an end, and the guest
    never notices beyond the pause."""
    vm = await start_vm(rig, "sid", name="drill-vm",
                        workdir=installed.vm_workdir("drill-vm"),
                        wait_ticking=True)
    assert rig.sid.alt_binary is not None
    ops = installed.state_dir / "operations"
    try:
        await installed.wait_listed(vm.uuid)
        pid = vm.pid
        old = installed.agent_pod()
        status = next(c for c in old["status"]["containerStatuses"] if c["name"] == "agent")
        agent_pid = installed.node.task_pid(status["containerID"])
        before = set(ops.glob("*.json"))
        mark = time.monotonic_ns()
        installed.apply_update("drill-vm", ["drill-vm"], rig.sid.alt_binary, rig.sid.version)

        def running() -> Path | None:
            for path in set(ops.glob("*.json")) - before:
                with contextlib.suppress(ValueError, OSError):
                    if json.loads(path.read_text())["state"] == "running":
                        return path
            return None

        record = await kube.wait_for(running, 120, "the agent to journal the operation",
                                     interval=0.01, describe=installed.logs)
        os.kill(agent_pid, signal.SIGKILL)
        # Killed with the operation journaled as running: from here only the restarted agent
        # ends the record (resolved_after_restart, checked below). No look at the record
        # now: the kubelet may restart the agent and it may resolve the record at once.
        # The kubelet restarts the container in the same pod; its agent resolves the operation.

        def restarted() -> Any:
            pod = installed.agent_pod()
            agent = next(c for c in pod["status"]["containerStatuses"] if c["name"] == "agent")
            return (pod if agent["restartCount"] > status["restartCount"] and agent.get("ready")
                    else None)

        again = await kube.wait_for(restarted, 180, "the kubelet to restart the agent",
                                    describe=installed.logs)
        assert again["metadata"]["uid"] == old["metadata"]["uid"]
        done = await kube.wait_for(
            lambda: (r := json.loads(record.read_text()))["state"] == "done" and r, 180,
            "the journaled operation to end", describe=installed.logs)
        outcome = done["result"]["outcome"]

        def row_end() -> Any:
            obj = kube.get(installed.kubectl, "vmupdate", "drill-vm") or {}
            row = kube.rows(installed.kubectl, obj).get("drill-vm") or {}
            return row if row.get("phase") in ("Updated", "Failed", "RolledBack") else None

        row = await kube.wait_for(row_end, 240, "the operator to follow drill-vm to an end",
                                  describe=installed.logs)
        print(f"agent killed with the operation running: journal outcome {outcome}, "
              f"row {row['phase']}")
        assert done["resolved_after_restart"] is True, "the operation ended before the kill"
        # Whatever the end, the VM runs in the same pid (cpr-exec), on the target (Updated) or
        # on its own QEMU (killed before the point of no return: Failed, "as before"; or
        # RolledBack), and the guest never rebooted nor lost memory.
        exe = exe_name(pid)
        if row["phase"] == "Updated":
            assert exe == Path(rig.sid.alt_binary).name, row
        else:
            assert exe == Path(rig.sid.binary).name, row
            assert "as before" in row["message"] or row["phase"] == "RolledBack", row
        assert vm.pid == pid
        assert await vm.query_status() == "running"
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous(since=mark)
    finally:
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        await vm.stop()


async def test_helm_upgrade_during_a_rollout(installed: Installed, rig: Rig) -> None:
    """``helm upgrade`` (a changed agent setting: a rolling DaemonSet update) while a rollout
    of two VMs, one at a time, runs: the old agent drains, the new one takes the rest, and the
    rollout completes with both guests continuous."""
    assert rig.sid.alt_binary is not None
    names = ["roll-a", "roll-b"]
    vms = await asyncio.gather(*(start_vm(
        rig, "sid", name=n, workdir=installed.vm_workdir(n),
        wait_ticking=True) for n in names))
    ops = installed.state_dir / "operations"
    try:
        await installed.wait_listed(*(vm.uuid for vm in vms))
        pids = [vm.pid for vm in vms]
        old = installed.agent_pod()
        before = set(ops.glob("*.json"))
        mark = time.monotonic_ns()
        installed.apply_update("rolling", names, rig.sid.alt_binary, rig.sid.version,
                               strategy={"maxParallel": 1, "maxParallelPerHost": 1})
        await kube.wait_for(lambda: set(ops.glob("*.json")) - before, 120,
                            "the first operation", interval=0.01, describe=installed.logs)
        helm(installed.sandbox, "upgrade", RELEASE, str(CHART), "-n", NAMESPACE,
             "-f", str(installed.values_file), "--set", "agent.verbose=true")
        obj = await installed.wait_update_ready("rolling", 300)
        await asyncio.to_thread(installed.wait_pods_ready, 180)
        new = installed.agent_pod()
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        agent = next(c for c in new["spec"]["containers"] if c["name"] == "agent")
        assert "--verbose" in agent["args"]
        rows = kube.rows(installed.kubectl, obj)
        for name, vm, pid in zip(names, vms, pids, strict=True):
            assert rows[name]["phase"] == "Updated", rows[name]
            assert vm.pid == pid and rows[name]["pidAfter"] == pid
            assert exe_name(pid) == Path(rig.sid.alt_binary).name
            await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
            vm.serial.assert_continuous(since=mark)
    finally:
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        for vm in vms:
            await vm.stop()


async def test_cordoned_node_keeps_its_agent_and_updates(installed: Installed, rig: Rig) -> None:
    """Cordon means "no new workloads here", not "hands off the running VMs": the agent is
    node infrastructure (like kube-proxy), so on a cordoned node its DaemonSet pod keeps
    running, comes back when deleted, and the node's VMs are still updated in place."""
    assert rig.sid.alt_binary is not None
    node = installed.node.name
    vm = await start_vm(rig, "sid", name="cordon-vm",
                        workdir=installed.vm_workdir("cordon-vm"),
                        wait_ticking=True)
    installed.kubectl("cordon", node, check=True)
    try:
        old = installed.agent_pod()
        installed.kubectl("-n", NAMESPACE, "delete", "pod", old["metadata"]["name"],
                          "--wait=false", check=True)

        def replaced() -> Any:
            pods = get(installed.sandbox, "pods", "-n", NAMESPACE, "-l",
                       "app.kubernetes.io/component=agent")["items"]
            return next((p for p in pods if p["metadata"]["uid"] != old["metadata"]["uid"]
                         and all(c.get("ready") for c in
                                 p["status"].get("containerStatuses") or [{}])), None)

        new = await kube.wait_for(replaced, 240, "a new agent pod on the cordoned node",
                                  describe=installed.logs)
        assert new["spec"]["nodeName"] == node
        assert get(installed.sandbox, "node", node)["spec"].get("unschedulable") is True
        await installed.wait_listed(vm.uuid)
        pid, mark = vm.pid, time.monotonic_ns()
        installed.apply_update("cordon-vm", ["cordon-vm"], rig.sid.alt_binary, rig.sid.version)
        obj = await installed.wait_update_ready("cordon-vm", 240)
        row = kube.rows(installed.kubectl, obj)["cordon-vm"]
        assert row["phase"] == "Updated" and row["pidAfter"] == pid == vm.pid, row
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous(since=mark)
    finally:
        installed.kubectl("uncordon", node)
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        await vm.stop()
