"""A VM in a pod: QEMU is the container's process, started from the VM pod image
(``e2e/image/qemu.sh``: the rig's sid QEMU root), on the real node.

What the pod needs, and nothing more (the README's node section lists it):
- the QMP socket in a hostPath folder that the agent's ``socket_globs`` match, mounted at the
  same path (the agent, hostPID, finds the QEMU by the socket's peer pid);
- the agent's ``runtime_dir`` as a hostPath at the same path (the engine's FIFOs and guard
  status are opened by the agent and, by path, by the VM's QEMU);
- the target builds from a hostPath (``/usr/lib/vmupdate-rig`` here): the image holds the
  QEMU the VM started with, a host package update brings the new one;
- the guest's kernel and initrd (read-only hostPath here; a disk image in real life);
- ``hostPID: true``: the guard the QEMU execs during cpr-exec watches the agent (hostPID) by
  its pid; in a pid namespace of its own it sees no agent and rolls back (found here: the VM
  was lost);
- no other privilege: TCG and a memfd RAM backend (``share=on``, as cpr needs); ``-uuid`` on the
  command line (the operator's VM identity); restartPolicy Never (a restarted container
  would be a fresh boot, not the same VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.sandbox import Sandbox
from e2e.node.node import Node
from e2e.rig import Rig, SerialMonitor
from e2e.rig.vm import build_argv, qmp_peer_pid

TOP = Path(__file__).resolve().parents[2]
TARGETS = "/usr/lib/vmupdate-rig"  # the rig's target builds, as the sid QEMU sees them


def build_qemu_image() -> tuple[Path, str]:
    """Build (cached by the sid root's version) and return the OCI archive and the image."""
    res = subprocess.run([str(TOP / "e2e/image/qemu.sh")], capture_output=True, text=True,
                         timeout=1800, check=False)
    assert res.returncode == 0, f"e2e/image/qemu.sh failed:\n{res.stderr[-4000:]}"
    archive, ref = res.stdout.strip().splitlines()[-2:]
    return Path(archive), ref


def vm_pod_manifest(rig: Rig, *, name: str, image: str, workdir: Path, runtime_dir: Path,
                    vm_uuid: str) -> dict[str, Any]:
    assert rig.sid.root is not None
    argv = build_argv(rig, "sid", name=name, workdir=workdir, vm_uuid=vm_uuid, mem_mib=256,
                      machine="pc-q35-10.0", backend="memfd", mem_path=None)
    command = [rig.sid.binary, *argv[1:]]  # the image's QEMU instead of the rig's wrapper
    mounts = [  # (host path, path in the container, read-only)
        (str(workdir), str(workdir), False),
        (str(runtime_dir), str(runtime_dir), False),
        (f"{rig.sid.root}{TARGETS}", TARGETS, True),
        (str(rig.kernel.parent), str(rig.kernel.parent), True),
    ]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "vm"}},
        "spec": {
            "restartPolicy": "Never",
            # The agent's guard, exec'd by this QEMU, watches the agent by its (host) pid: in
            # a pid namespace of its own it finds no agent and rolls the update back.
            "hostPID": True,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "qemu", "image": image, "imagePullPolicy": "Never",
                "command": command,
                "volumeMounts": [{"name": f"v{i}", "mountPath": dst, "readOnly": ro}
                                 for i, (_, dst, ro) in enumerate(mounts)]}],
            "volumes": [{"name": f"v{i}", "hostPath": {"path": src, "type": "Directory"}}
                        for i, (src, _, _) in enumerate(mounts)],
        },
    }


@dataclass
class VMPod:
    sandbox: Sandbox
    node: Node
    name: str
    uuid: str
    workdir: Path
    serial: SerialMonitor
    pid: int = 0

    @classmethod
    async def start(cls, sandbox: Sandbox, node: Node, rig: Rig, *, name: str, image: str,
                    workdir: Path, runtime_dir: Path, timeout: float = 120) -> VMPod:
        """Create the pod and return once its guest ticks (pid = the QEMU's host pid)."""
        workdir.mkdir(parents=True)
        vm_uuid = str(uuid.uuid4())
        manifest = vm_pod_manifest(rig, name=name, image=image, workdir=workdir,
                                   runtime_dir=runtime_dir, vm_uuid=vm_uuid)
        vm = cls(sandbox, node, name, vm_uuid, workdir,
                 SerialMonitor(workdir / "serial.log").start())
        sandbox.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=True)
        try:
            deadline = time.monotonic() + timeout
            while (peer := qmp_peer_pid(vm.qmp_path)) is None:
                assert time.monotonic() < deadline, (
                    f"VM pod {name}: no QMP socket\n{node.pod_logs('default', name)}")
                await asyncio.sleep(0.2)
            vm.pid = peer
            await vm.serial.wait_for(lambda: len(vm.serial.ticks) >= 3, timeout=90,
                                     what=f"{name} to tick")
        except BaseException:
            await vm.stop()
            raise
        return vm

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    def container_pid(self) -> int:
        pod = json.loads(self.sandbox.kubectl("get", "pod", "-n", "default", self.name, "-o",
                                              "json", check=True).stdout)
        status = pod["status"]["containerStatuses"][0]
        return self.node.task_pid(status["containerID"])

    def phase(self) -> str:
        return self.sandbox.kubectl("get", "pod", "-n", "default", self.name, "-o",
                                    "jsonpath={.status.phase}", check=True).stdout

    async def stop(self) -> None:
        await asyncio.to_thread(self.sandbox.kubectl, "delete", "pod", "-n", "default",
                                self.name, "--ignore-not-found", "--timeout=60s")
        with contextlib.suppress(Exception):
            self.serial.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.qmp_path)
