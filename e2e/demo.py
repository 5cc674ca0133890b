"""The main job on an embedded default: a local sandbox cluster, one node with a small real
VM, the agent and the operator, and one `kubectl apply` of a VMUpdate that moves the VM to
another QEMU binary in place (cpr-exec, same pid), with the guest checked from outside.

Run by `bin/demo` after the set-up; `python -m e2e.demo` once everything is provisioned.
Everything it starts is stopped at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.sandbox import Sandbox
from e2e.k8s import kube
from e2e.k8s.nodes import make_fleet
from e2e.k8s.operator_process import OperatorProcess
from e2e.k8s.pki import make_fleet_pki
from e2e.rig import load_rig, start_vm
from vmupdate_agent import guard, reaper

TOP = Path(__file__).resolve().parent.parent
NODE = "node-a"
VM = "demo-vm"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def kubectl_json(cluster: Sandbox, *args: str) -> Any:
    res = cluster.kubectl(*args, "-o", "json", timeout=30)
    return json.loads(res.stdout) if res.returncode == 0 else None


async def wait(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.5)


def vmupdate_manifest(binary: str, version: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "vmupdate.dev/v1alpha1", "kind": "VMUpdate",
        "metadata": {"name": "demo-qemu-update"},
        "spec": {"selector": {"hostNames": [NODE], "vmNames": [VM]},
                 "target": {"binary": binary, "version": version},
                 "mode": "CprExec",
                 "strategy": {"maxParallel": 1, "maxParallelPerHost": 1,
                              "pauseBudgetMs": 5000}}})


async def demo(workdir: Path) -> int:
    rig = load_rig()
    say("starting the sandbox control plane (etcd + kube-apiserver + controller-manager)")
    cluster = Sandbox.start(workdir / "cluster")
    # The agent's registrar and the operator find the cluster as any client does.
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    fleet = None
    operator = None
    vm = None
    try:
        # The CRDs, and kopf's peering resource (the operator's HA lock), as a chart would.
        for folder in ("crds", "operator/manifests"):
            for path in sorted((TOP / folder).glob("*.yaml")):
                res = cluster.kubectl("apply", "--server-side", "-f", str(path), timeout=60)
                assert res.returncode == 0, res.stderr
                cluster.kubectl("wait", "--for=condition=Established", "crd", "--all",
                                timeout=60)
        say(f"starting the node agent and its VMHost registrar for {NODE}")
        pki = make_fleet_pki(workdir / "pki")
        fleet = make_fleet([NODE], rig=rig, pki=pki, workdir=workdir,
                           guard_binary=guard.build(workdir / "guard"))
        node = fleet.node(NODE)
        node.start()
        say(f"booting a small VM ({VM}: 256 MiB, QEMU {rig.sid.version}, TCG)")
        vm = await start_vm(rig, "sid", name=VM, workdir=node.vm_dir / VM)
        token = await vm.wait_ticking(120)
        print(f"guest is ticking; boot token {token}; QEMU pid {vm.pid}")
        say("starting the operator")
        operator = OperatorProcess(pki, workdir / "logs")
        operator.start()
        await wait(lambda: any(r.get("name") == VM for r in (kubectl_json(
            cluster, "get", "vmhost", NODE) or {}).get("status", {}).get("vms", [])),
            120, f"VMHost {NODE} to list {VM}")
        print(cluster.kubectl("get", "vmhosts", timeout=30).stdout)

        assert rig.sid.alt_binary is not None
        say(f"kubectl apply: move {VM} to {rig.sid.alt_binary} (QEMU {rig.sid.version})")
        since = time.monotonic_ns()
        res = cluster.kubectl("apply", "-f", "-", timeout=30,
                              input=vmupdate_manifest(rig.sid.alt_binary, rig.sid.version))
        print(res.stdout or res.stderr)

        def ready() -> dict[str, Any] | None:
            obj = kubectl_json(cluster, "get", "vmupdate", "demo-qemu-update")
            conds = {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions", [])}
            return obj if conds.get("Ready", {}).get("status") == "True" else None

        try:
            obj = await wait(ready, 300, "the VMUpdate to be Ready")
        except TimeoutError:
            print(cluster.kubectl("get", "vmupdate", "demo-qemu-update", "-o", "yaml",
                                  timeout=30).stdout)
            print(operator.log()[-4000:])
            print(node.logs_tail(30))
            raise
        print(cluster.kubectl("get", "vmupdates", timeout=30).stdout)
        print(cluster.kubectl("get", "vmupdatehosts", timeout=30).stdout)
        for row in kube.rows(cluster.kubectl, obj).values():
            print(f"{row['host']}/{row['name']}: {row.get('fromVersion')} -> "
                  f"{row.get('toVersion')}, pid {row.get('pidBefore')} -> "
                  f"{row.get('pidAfter')}, mode {row.get('mode')}, guest pause "
                  f"{row.get('pauseMs')} ms, {row.get('phase')}")
        await vm.serial.wait_ticks(10, after=time.monotonic_ns(), timeout=30)
        vm.serial.assert_continuous()
        print(f"guest continuous: counter went on by one per line, same token {vm.token}, "
              f"RAM checksums ok; largest gap seen on its serial line since the apply: "
              f"{vm.serial.max_gap_ms(since=since):.0f} ms")
        return 0
    finally:
        say("cleaning up")
        if operator is not None:
            operator.stop()
        if vm is not None:
            await vm.stop()
        if fleet is not None:
            fleet.stop()
        cluster.stop()


def main() -> int:
    reaper.become_subreaper()
    stop = reaper.OrphanReaper().start_thread()
    try:
        with tempfile.TemporaryDirectory(prefix="vmupdate-demo-") as tmp:
            return asyncio.run(demo(Path(tmp)))
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())
