"""A containerd of our own: its own root, state, socket and network namespace, and ``ctr``.

It runs inside a network namespace created here (:class:`Netns`), so the CNI bridge it sets
up for pods lives there too, never in the host's namespace. Everything it leaves behind (tasks,
shims, mounts) is removed by :meth:`Containerd.stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from e2e.cluster.sandbox import ManagedProcess, SandboxError

#: sockets and state (unix socket paths must stay short)
RUN_ROOT = Path("/run/vmupdate-node")
#: where e2e/node/provision.sh keeps the pod sandbox image
NODE_CACHE = Path(os.environ.get("VMUPDATE_CACHE", "/var/cache/vmupdate")) / "node"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins


class NodeError(SandboxError):
    """The node (containerd, kubelet, ...) could not be set up or used."""


def run(argv: list[str], *, timeout: float = 60, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                         input=input)
    if check and res.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed ({res.returncode}): "
                        f"{res.stderr.strip() or res.stdout.strip()}")
    return res


@dataclass
class Netns:
    """A network namespace made here (``ip netns``); deleted by :meth:`delete`."""

    name: str

    @classmethod
    def create(cls, prefix: str = "vmupdate-node") -> Netns:
        ns = cls(f"{prefix}-{secrets.token_hex(3)}")
        run(["ip", "netns", "add", ns.name])
        ns.exec("ip", "link", "set", "lo", "up")
        return ns

    def argv(self, *argv: str) -> list[str]:
        # Not `ip netns exec`: that also gives the command a private mount namespace, and the
        # kubelet's volume mounts must be seen by containerd (and the host's by the pods).
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]

    def exec(self, *argv: str, check: bool = True, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*argv), check=check, timeout=timeout)

    def delete(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)


def pause_image_archive() -> tuple[Path, str]:
    """The pause image's OCI archive and its name (e2e/node/provision.sh builds it)."""
    archive = NODE_CACHE / "pause.oci.tar"
    if not archive.exists():
        raise NodeError(f"{archive} missing: run e2e/node/provision.sh")
    real = archive.resolve()
    key = real.name.removeprefix("pause-").removesuffix(".oci.tar")
    return real, f"localhost/vmupdate-pause:{key}"


def _config(root: Path, state: Path, sock: Path, sandbox_image: str, cni_conf_dir: Path) -> str:
    return f"""version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # Without CAP_SYS_RESOURCE (as on these machines) a pod's oom_score_adj below containerd's
  # own cannot be set, and the kubelet asks -998 for every pod sandbox: cap them at ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"""


@dataclass
class Containerd:
    workdir: Path
    netns: Netns
    socket: Path
    state: Path
    proc: ManagedProcess
    sandbox_image: str
    _stopped: bool = field(default=False)

    @classmethod
    def start(cls, workdir: Path, netns: Netns, *, cni_conf_dir: Path | None = None,
              timeout: float = 30) -> Containerd:
        for tool in ("containerd", "ctr", "runc"):
            if shutil.which(tool) is None:
                raise NodeError(f"{tool} not installed: run e2e/node/provision.sh")
        archive, pause = pause_image_archive()
        run_dir = RUN_ROOT / netns.name
        run_dir.mkdir(parents=True, exist_ok=True)
        sock, state = run_dir / "containerd.sock", run_dir / "state"
        cni = cni_conf_dir or workdir / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        conf = workdir / "containerd.toml"
        conf.write_text(_config(workdir / "containerd", state, sock, pause, cni))
        proc = ManagedProcess("containerd", netns.argv("containerd", "--config", str(conf)),
                              workdir / "logs" / "containerd.log")
        c = cls(workdir=workdir, netns=netns, socket=sock, state=state, proc=proc,
                sandbox_image=pause)
        proc.start(die_with_parent=True)
        deadline = time.monotonic() + timeout
        while c.ctr("version", check=False).returncode != 0:
            if proc.exited() is not None or time.monotonic() > deadline:
                c.stop()
                raise NodeError(f"containerd did not start:\n{proc.tail()}")
            time.sleep(0.2)
        c.import_image(archive)
        return c

    def ctr(self, *args: str, check: bool = True, timeout: float = 120,
            namespace: str = "k8s.io") -> subprocess.CompletedProcess[str]:
        return run(["ctr", "--address", str(self.socket), "--namespace", namespace, *args],
                   check=check, timeout=timeout)

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive), timeout=300)

    def run(self, image: str, argv: list[str], *, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a fresh container of ``image`` as the image's user (own, empty
        network namespace)."""
        name = f"run-{secrets.token_hex(4)}"
        return self.ctr("run", "--rm", image, name, *argv, check=False, timeout=timeout)

    def shim_pids(self) -> list[int]:
        """Our shims: they outlive containerd, and name its socket on their command line."""
        pids = []
        want = os.fsencode(str(self.socket))
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if argv and argv[0].endswith(b"containerd-shim-runc-v2") and want in argv:
                    pids.append(int(p.name))
        return pids

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        pod_netns: set[str] = set()
        if self.proc.exited() is None:
            for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
                for c in self.ctr("containers", "ls", "-q", namespace=ns,
                                  check=False).stdout.split():
                    pod_netns |= self._netns_of(c, ns)
                tasks = self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split()
                for t in tasks:
                    self.ctr("tasks", "kill", "-s", "SIGKILL", t, namespace=ns, check=False)
                for t in tasks:
                    for _ in range(50):
                        if self.ctr("tasks", "rm", "-f", t, namespace=ns,
                                    check=False).returncode == 0:
                            break
                        time.sleep(0.1)
        self.proc.stop(timeout=10)
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        umount_below(self.state)
        umount_below(self.workdir)
        # The pods' network namespaces, which this containerd made (ip netns names).
        for path in pod_netns:
            umount_below(Path(path))
            with contextlib.suppress(OSError):
                os.unlink(path)
        shutil.rmtree(self.state.parent, ignore_errors=True)

    def _netns_of(self, container: str, namespace: str) -> set[str]:
        res = self.ctr("containers", "info", container, namespace=namespace, check=False)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            spaces = json.loads(res.stdout)["Spec"]["linux"]["namespaces"]
            return {n["path"] for n in spaces
                    if n.get("type") == "network" and "/netns/cni-" in n.get("path", "")}
        return set()


def umount_below(path: Path) -> None:
    """Unmount everything at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    res = run(["findmnt", "-rn", "-o", "TARGET"], check=False)
    mounts = [m.encode().decode("unicode_escape") for m in res.stdout.splitlines()]
    for m in sorted((m for m in mounts if m == base or m.startswith(base + "/")), reverse=True):
        run(["umount", "-l", m], check=False)
