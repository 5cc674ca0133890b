"""A real node in the sandbox cluster (e2e/node): containerd + runc, the CNI bridge, kubelet,
kube-proxy and kube-scheduler, in a network namespace of its own.

* the node registers and becomes Ready (kubelet on this cgroup v1 machine, failCgroupV1: false);
* a pod of the project's image is scheduled, gets an address from the pod network, and reaches
  the API server through the ``kubernetes`` Service with in-cluster config, authenticated as
  its ServiceAccount;
* ``helm install`` as the README says (TLS Secrets made beforehand) runs the operator
  Deployment (2 replicas, kopf peering, in-cluster config) and the agent DaemonSet (privileged,
  hostPID, hostPaths at the same paths) as pods of the built image, all Ready;
* a VMUpdate applied with kubectl updates a VM on the host in place through those pods
  (cpr-exec: same pid, now the target binary; guest counter continuous, token unchanged, RAM
  checksums good).

Drills: the agent's container killed mid-update; ``helm upgrade`` during a rollout; a cordoned
node. One module past the usual length on purpose: the node, the release and the drills share
one node and one installed chart (module-scoped fixtures); split, each module would bring up
its own.

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
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.sandbox import Sandbox, versions
from e2e.k8s import kube
from e2e.k8s.pki import make_fleet_pki
from e2e.node.containerd import umount_below
from e2e.node.node import POD_CIDR, Node
from e2e.rig import Rig, start_vm
from e2e.test_k8s_node_image import TOP as REPO
from e2e.test_k8s_node_image import build_image

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Node, str]]:
    archive, image = build_image()
    # A cluster of its own: its scheduler and node must not run other tests' Pending pods.
    sandbox = Sandbox.start(tmp_path_factory.mktemp("node-k8s"))
    try:
        node = Node.start(sandbox, tmp_path_factory.mktemp("node"))
        try:
            node.import_image(archive)
            yield sandbox, node, image
        finally:
            node.stop()
    finally:
        sandbox.stop()


def get(sandbox: Sandbox, *args: str) -> Any:
    return json.loads(sandbox.kubectl("get", *args, "-o", "json", check=True).stdout)


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

RELEASE, NAMESPACE = "vmupdate", "vmupdate"
CHART = REPO / "charts" / "vmupdate"


def create_tls_secret(sandbox: Sandbox, name: str, cert: Path, key: Path, ca: Path) -> None:
    sandbox.kubectl("-n", NAMESPACE, "create", "secret", "generic", name,
                    f"--from-file=tls.crt={cert}", f"--from-file=tls.key={key}",
                    f"--from-file=ca.crt={ca}", check=True)


def helm(sandbox: Sandbox, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "KUBECONFIG": str(sandbox.kubeconfig),
           "HELM_CACHE_HOME": str(sandbox.workdir / "helm" / "cache"),
           "HELM_CONFIG_HOME": str(sandbox.workdir / "helm" / "config"),
           "HELM_DATA_HOME": str(sandbox.workdir / "helm" / "data")}
    res = subprocess.run([str(sandbox.helm_path), *args], capture_output=True, text=True,
                         timeout=timeout, env=env, check=False)
    assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stderr}{res.stdout}"
    return res.stdout


@dataclass
class Installed:
    sandbox: Sandbox
    node: Node
    vm_dir: Path
    state_dir: Path
    runtime_dir: Path
    values_file: Path

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.sandbox.kubectl(*args, **kw)

    def wait_pods_ready(self, timeout: float) -> None:
        """Both operator replicas and the node's agent pod (every container) Ready."""
        deadline = time.monotonic() + timeout
        while True:
            deploy = get(self.sandbox, "deployment", "-n", NAMESPACE, f"{RELEASE}-operator")
            ds = get(self.sandbox, "daemonset", "-n", NAMESPACE, f"{RELEASE}-agent")
            if (deploy["status"].get("readyReplicas") == 2
                    and deploy["status"].get("updatedReplicas") == 2
                    and ds["status"].get("numberReady") == 1
                    and ds["status"].get("updatedNumberScheduled") == 1):
                return
            if time.monotonic() > deadline:
                pods = get(self.sandbox, "pods", "-n", NAMESPACE)["items"]
                states = [(p["metadata"]["name"], p["status"].get("phase"),
                           [c.get("state") for c in p["status"].get("containerStatuses") or []])
                          for p in pods]
                raise AssertionError(f"pods not ready: {json.dumps(states, indent=1)}\n"
                                     f"{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(self.node.pod_logs(NAMESPACE, p) for p in (
            f"{RELEASE}-operator", f"{RELEASE}-agent"))


@pytest.fixture(scope="module")
def installed(real_node: tuple[Sandbox, Node, str], rig: Rig,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The chart installed as the README says, onto the real node, for the host's VMs."""
    sandbox, node, _ = real_node
    work = tmp_path_factory.mktemp("chart")
    token = secrets.token_hex(3)
    inst = Installed(sandbox, node, vm_dir=rig.vms_dir / f"node-{token}",
                     state_dir=work / "state", values_file=work / "values.yaml",
                     # Below the rig's share: the chrooted QEMU sees it at the same path.
                     runtime_dir=rig.share / "at" / f"node-{token}")
    pki = make_fleet_pki(work / "pki")
    sandbox.kubectl("create", "namespace", NAMESPACE, check=True)
    agent = pki.agent("vmupdate-agent")  # the chart's agentServerName
    for name, pair in (("vmupdate-operator-tls", pki.operator),
                       ("vmupdate-registrar-tls", pki.registrar),
                       ("vmupdate-agent-tls", agent)):
        create_tls_secret(sandbox, name, pair.cert, pair.key, pki.ca_cert)
    assert rig.sid.alt_binary is not None
    values = {
        "agent": {"config": {
            "socket_globs": [f"{inst.vm_dir}/*/qmp.sock"],
            "allowed_binary_dirs": [str(Path(rig.sid.alt_binary).parent),
                                    str(Path(rig.sid.binary).parent)],
            "state_dir": str(inst.state_dir), "runtime_dir": str(inst.runtime_dir)}},
        "registrar": {"intervalSeconds": 2},
        "operator": {"resyncSeconds": 3},
    }
    values_file = inst.values_file
    values_file.write_text(yaml.safe_dump(values))
    for path in (inst.vm_dir, inst.state_dir, inst.runtime_dir):
        node.share_host_path(path)
    try:
        t0 = time.monotonic()
        # README: helm install vmupdate charts/vmupdate -n vmupdate --create-namespace
        helm(sandbox, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace",
             "-f", str(values_file), "--wait", "--timeout", "5m")
        inst.wait_pods_ready(180)
        print(f"helm install, all pods ready: {time.monotonic() - t0:.1f} s")
        yield inst
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            helm(sandbox, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "3m")
        for path in (inst.vm_dir, inst.runtime_dir):
            umount_below(path)
            shutil.rmtree(path, ignore_errors=True)


def test_chart_runs_its_pods_on_the_node(installed: Installed) -> None:
    deploy = get(installed.sandbox, "deployment", "-n", NAMESPACE, f"{RELEASE}-operator")
    assert deploy["status"].get("readyReplicas") == 2
    ds = get(installed.sandbox, "daemonset", "-n", NAMESPACE, f"{RELEASE}-agent")
    assert ds["status"]["numberReady"] == 1 == ds["status"]["desiredNumberScheduled"]
    pods = get(installed.sandbox, "pods", "-n", NAMESPACE)["items"]
    assert {p["spec"]["nodeName"] for p in pods} == {installed.node.name}
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert images == {"vmupdate:0.1.0"}


async def test_vmupdate_updates_a_host_vm_in_place(installed: Installed, rig: Rig) -> None:
    vm = await start_vm(rig, "sid", name="host-vm",
                        workdir=installed.vm_dir / f"host-vm-{secrets.token_hex(3)}",
                        wait_ticking=True)
    assert rig.sid.alt_binary is not None
    try:
        pid, token = vm.pid, vm.serial.token
        node = installed.node.name

        def listed() -> bool:
            host = kube.get(installed.kubectl, "vmhost", node) or {}
            return any(v.get("uuid") == vm.uuid
                       for v in (host.get("status") or {}).get("vms") or [])

        await kube.wait_for(listed, 90, f"VMHost {node} to list the VM",
                            describe=installed.logs)
        manifest = {
            "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
            "metadata": {"name": "host-vm"},
            "spec": {"selector": {"vmNames": ["host-vm"]},
                     "target": {"binary": rig.sid.alt_binary, "version": rig.sid.version},
                     "mode": "CprExec"}}
        mark = time.monotonic_ns()
        kube.apply(installed.kubectl, yaml.safe_dump(manifest))

        def ready() -> Any:
            obj = kube.get(installed.kubectl, "vmupdate", "host-vm")
            return obj if kube.condition(obj, "Ready").get("status") == "True" else None

        obj = await kube.wait_for(ready, 240, "VMUpdate host-vm Ready",
                                  describe=installed.logs)
        row = kube.rows(obj)["host-vm"]
        assert row["phase"] == "Updated" and row["host"] == node, row
        assert row["pidBefore"] == row["pidAfter"] == pid == vm.pid
        assert Path(f"/proc/{pid}/exe").readlink().name == Path(rig.sid.alt_binary).name
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous(since=mark)
        assert vm.serial.token == token
    finally:
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        await vm.stop()


# --------------------------------------------------------------------------- drills

TERMINAL = {"Updated", "Failed", "RolledBack"}


def agent_pod(installed: Installed) -> dict[str, Any]:
    pods = get(installed.sandbox, "pods", "-n", NAMESPACE, "-l",
               "app.kubernetes.io/component=agent")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in pods]
    return dict(live[0])


async def test_agent_killed_mid_update(installed: Installed, rig: Rig) -> None:
    """The agent's container killed (SIGKILL: no drain) while its journal holds the running
    operation: the kubelet restarts it, the new agent reads the journal on the hostPath and
    finishes or rolls back the operation, the operator follows it to an end, and the guest
    never notices beyond the pause."""
    vm = await start_vm(rig, "sid", name="drill-vm",
                        workdir=installed.vm_dir / f"drill-vm-{secrets.token_hex(3)}",
                        wait_ticking=True)
    assert rig.sid.alt_binary is not None
    ops = installed.state_dir / "operations"
    try:
        node = installed.node.name
        await kube.wait_for(
            lambda: any(v.get("uuid") == vm.uuid for v in
                        ((kube.get(installed.kubectl, "vmhost", node) or {}).get("status")
                         or {}).get("vms") or []),
            90, "the VMHost to list drill-vm", describe=installed.logs)
        pid = vm.pid
        old = agent_pod(installed)
        status = next(c for c in old["status"]["containerStatuses"] if c["name"] == "agent")
        agent_pid = installed.node.task_pid(status["containerID"])
        before = set(ops.glob("*.json"))
        manifest = {
            "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
            "metadata": {"name": "drill-vm"},
            "spec": {"selector": {"vmNames": ["drill-vm"]},
                     "target": {"binary": rig.sid.alt_binary, "version": rig.sid.version},
                     "mode": "CprExec"}}
        mark = time.monotonic_ns()
        kube.apply(installed.kubectl, yaml.safe_dump(manifest))

        def running() -> Path | None:
            for path in set(ops.glob("*.json")) - before:
                with contextlib.suppress(ValueError, OSError):
                    if json.loads(path.read_text())["state"] == "running":
                        return path
            return None

        record = await kube.wait_for(running, 120, "the agent to journal the operation",
                                     interval=0.01, describe=installed.logs)
        os.kill(agent_pid, signal.SIGKILL)
        # Killed with the operation journaled as running (nobody else writes the record).
        await asyncio.sleep(0.5)
        assert json.loads(record.read_text())["state"] == "running", "ended before the kill"
        # The kubelet restarts the container in the same pod; its agent resolves the operation.

        def restarted() -> Any:
            pod = agent_pod(installed)
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
            row = kube.rows(obj).get("drill-vm") or {}
            return row if row.get("phase") in TERMINAL else None

        row = await kube.wait_for(row_end, 240, "the operator to follow drill-vm to an end",
                                  describe=installed.logs)
        print(f"agent killed with the operation running: journal outcome {outcome}, "
              f"row {row['phase']}")
        assert done["resolved_after_restart"] is True
        # Whatever the end, the VM runs in the same pid (cpr-exec), on the target (Updated) or
        # on its own QEMU (killed before the point of no return: Failed, "as before"; or
        # RolledBack), and the guest never rebooted nor lost memory.
        exe = Path(f"/proc/{pid}/exe").readlink().name
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
        rig, "sid", name=n, workdir=installed.vm_dir / f"{n}-{secrets.token_hex(3)}",
        wait_ticking=True) for n in names))
    ops = installed.state_dir / "operations"
    try:
        node = installed.node.name

        def listed() -> bool:
            host = kube.get(installed.kubectl, "vmhost", node) or {}
            found = {v.get("uuid") for v in (host.get("status") or {}).get("vms") or []}
            return {vm.uuid for vm in vms} <= found

        await kube.wait_for(listed, 90, "the VMHost to list both VMs", describe=installed.logs)
        pids = [vm.pid for vm in vms]
        old = agent_pod(installed)
        before = set(ops.glob("*.json"))
        manifest = {
            "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
            "metadata": {"name": "rolling"},
            "spec": {"selector": {"vmNames": names},
                     "target": {"binary": rig.sid.alt_binary, "version": rig.sid.version},
                     "mode": "CprExec",
                     "strategy": {"maxParallel": 1, "maxParallelPerHost": 1}}}
        mark = time.monotonic_ns()
        kube.apply(installed.kubectl, yaml.safe_dump(manifest))
        await kube.wait_for(lambda: set(ops.glob("*.json")) - before, 120,
                            "the first operation", interval=0.01, describe=installed.logs)
        helm(installed.sandbox, "upgrade", RELEASE, str(CHART), "-n", NAMESPACE,
             "-f", str(installed.values_file), "--set", "agent.verbose=true")

        def ready() -> Any:
            obj = kube.get(installed.kubectl, "vmupdate", "rolling")
            return obj if kube.condition(obj, "Ready").get("status") == "True" else None

        obj = await kube.wait_for(ready, 300, "VMUpdate rolling Ready", describe=installed.logs)
        await asyncio.to_thread(installed.wait_pods_ready, 180)
        new = agent_pod(installed)
        assert new["metadata"]["uid"] != old["metadata"]["uid"]
        agent = next(c for c in new["spec"]["containers"] if c["name"] == "agent")
        assert "--verbose" in agent["args"]
        rows = kube.rows(obj)
        for name, vm, pid in zip(names, vms, pids, strict=True):
            assert rows[name]["phase"] == "Updated", rows[name]
            assert vm.pid == pid and rows[name]["pidAfter"] == pid
            assert Path(f"/proc/{pid}/exe").readlink().name == Path(rig.sid.alt_binary).name
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
                        workdir=installed.vm_dir / f"cordon-vm-{secrets.token_hex(3)}",
                        wait_ticking=True)
    installed.kubectl("cordon", node, check=True)
    try:
        old = agent_pod(installed)
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
        await kube.wait_for(
            lambda: any(v.get("uuid") == vm.uuid for v in
                        ((kube.get(installed.kubectl, "vmhost", node) or {}).get("status")
                         or {}).get("vms") or []),
            90, "the VMHost to list cordon-vm", describe=installed.logs)
        pid, mark = vm.pid, time.monotonic_ns()
        manifest = {
            "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
            "metadata": {"name": "cordon-vm"},
            "spec": {"selector": {"vmNames": ["cordon-vm"]},
                     "target": {"binary": rig.sid.alt_binary, "version": rig.sid.version},
                     "mode": "CprExec"}}
        kube.apply(installed.kubectl, yaml.safe_dump(manifest))

        def ready() -> Any:
            obj = kube.get(installed.kubectl, "vmupdate", "cordon-vm")
            return obj if kube.condition(obj, "Ready").get("status") == "True" else None

        obj = await kube.wait_for(ready, 240, "VMUpdate cordon-vm Ready",
                                  describe=installed.logs)
        row = kube.rows(obj)["cordon-vm"]
        assert row["phase"] == "Updated" and row["pidAfter"] == pid == vm.pid, row
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous(since=mark)
    finally:
        installed.kubectl("uncordon", node)
        await asyncio.to_thread(kube.delete_vmupdates, installed.kubectl, 120)
        await vm.stop()
