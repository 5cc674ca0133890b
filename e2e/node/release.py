"""The chart installed onto a real node (:class:`~e2e.node.node.Node`) as the README says, and
the kubectl steps the node tests share: apply a VMUpdate, wait for a VMHost to list VMs, wait
for a VMUpdate to be Ready.

No certificate is made beforehand: with the chart's defaults (``certificates.agentServing:
csr``, ``create: selfSigned``) the chart makes its CA and the operator's and registrar's
client certificates, and the agent pod's certificate sidecar gets its node's serving
certificate from the operator through the CSR API, as a plain ``helm install`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.sandbox import Sandbox
from e2e.k8s import kube
from e2e.node.containerd import umount_below
from e2e.node.node import Node
from e2e.rig import Rig

RELEASE, NAMESPACE = "vmupdate", "vmupdate"
CHART = Path(__file__).resolve().parents[2] / "charts" / "vmupdate"
TERMINAL = {"Updated", "Failed", "RolledBack", "Skipped"}


def get(sandbox: Sandbox, *args: str) -> Any:
    return json.loads(sandbox.kubectl("get", *args, "-o", "json", check=True).stdout)


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

    def agent_pod(self) -> dict[str, Any]:
        pods = get(self.sandbox, "pods", "-n", NAMESPACE, "-l",
                   "app.kubernetes.io/component=agent")["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == 1, [p["metadata"]["name"] for p in pods]
        return dict(live[0])

    def vm_workdir(self, name: str) -> Path:
        """A fresh VM folder the agent's socket glob matches."""
        return self.vm_dir / f"{name}-{secrets.token_hex(3)}"

    async def wait_listed(self, *uuids: str, timeout: float = 90) -> None:
        """Until the node's VMHost lists every VM of ``uuids``."""
        def listed() -> bool:
            host = kube.get(self.kubectl, "vmhost", self.node.name) or {}
            found = {v.get("uuid") for v in (host.get("status") or {}).get("vms") or []}
            return set(uuids) <= found

        await kube.wait_for(listed, timeout, f"VMHost {self.node.name} to list {uuids}",
                            describe=self.logs)

    def apply_update(self, name: str, vm_names: list[str], binary: str, version: str,
                     **spec: Any) -> None:
        manifest = {"apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
                    "metadata": {"name": name},
                    "spec": {"selector": {"vmNames": vm_names},
                             "target": {"binary": binary, "version": version},
                             "mode": "CprExec", **spec}}
        kube.apply(self.kubectl, yaml.safe_dump(manifest))

    async def wait_update_ready(self, name: str, timeout: float = 240) -> Any:
        def ready() -> Any:
            obj = kube.get(self.kubectl, "vmupdate", name)
            return obj if kube.condition(obj, "Ready").get("status") == "True" else None

        return await kube.wait_for(ready, timeout, f"VMUpdate {name} Ready", describe=self.logs)

    async def wait_rows_end(self, name: str, vm_names: list[str], timeout: float = 240) -> Any:
        """Until every row of ``vm_names`` in VMUpdate ``name`` is in a terminal phase."""
        def ended() -> Any:
            rows = kube.rows(self.kubectl, kube.get(self.kubectl, "vmupdate", name) or {})
            done = all((rows.get(n) or {}).get("phase") in TERMINAL for n in vm_names)
            return rows if done else None

        return await kube.wait_for(ended, timeout, f"VMUpdate {name}'s rows to end",
                                   describe=self.logs)


@contextlib.contextmanager
def install(sandbox: Sandbox, node: Node, rig: Rig, work: Path) -> Iterator[Installed]:
    """``helm install`` onto ``node`` for the host's VMs (and the VM pods') under
    ``rig.share``; uninstalled and the VM folders removed on exit."""
    token = secrets.token_hex(3)
    inst = Installed(sandbox, node, vm_dir=rig.vms_dir / f"node-{token}",
                     state_dir=work / "state", values_file=work / "values.yaml",
                     # Below the rig's share: the chrooted QEMU sees it at the same path.
                     runtime_dir=rig.share / "at" / f"node-{token}")
    assert rig.sid.alt_binary is not None
    # The README's values: the hosts' paths only; the certificates are the chart's defaults.
    values = {
        "agent": {"config": {
            "socket_globs": [f"{inst.vm_dir}/*/qmp.sock"],
            "allowed_binary_dirs": [str(Path(rig.sid.alt_binary).parent),
                                    str(Path(rig.sid.binary).parent)],
            "state_dir": str(inst.state_dir), "runtime_dir": str(inst.runtime_dir)}},
        "registrar": {"intervalSeconds": 2},
        "operator": {"resyncSeconds": 3},
    }
    inst.values_file.write_text(yaml.safe_dump(values))
    for path in (inst.vm_dir, inst.state_dir, inst.runtime_dir):
        node.share_host_path(path)
    try:
        t0 = time.monotonic()
        # README: helm install vmupdate charts/vmupdate -n vmupdate --create-namespace
        helm(sandbox, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace",
             "-f", str(inst.values_file), "--wait", "--timeout", "5m")
        inst.wait_pods_ready(180)
        print(f"helm install, all pods ready: {time.monotonic() - t0:.1f} s")
        yield inst
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            helm(sandbox, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "3m")
        for path in (inst.vm_dir, inst.runtime_dir):
            umount_below(path)
            shutil.rmtree(path, ignore_errors=True)
