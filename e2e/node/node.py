"""A real Kubernetes node for the sandbox cluster: containerd + runc, the CNI bridge,
kubelet and kube-proxy, plus the cluster's kube-scheduler.

The node lives in a network namespace made here (its "host network"): the node address
``NODE_IP`` on a veth interface, the pods' bridge ``cni0`` with ``POD_CIDR``, kube-proxy's
rules. Nothing of it touches the host's network namespace. The API server (a
:class:`~e2e.cluster.sandbox.Sandbox` on the host's loopback) is reached from inside through a
forwarder pair joined by a unix socket: ``NODE_IP:6443`` and ``127.0.0.1:6443`` in the node's
namespace lead to it. The ``kubernetes`` Service's endpoint is ``NODE_IP:6443``, so pods reach
the API server through the Service (in-cluster config), as in production.

The kubelet runs with ``failCgroupV1: false``: these machines have a cgroup v1 (hybrid)
hierarchy, which kubelet 1.36 still runs on with that setting.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from e2e.cluster.sandbox import ManagedProcess, Sandbox, _write, find_binary, make_kubeconfig
from e2e.node.containerd import RUN_ROOT, Containerd, Netns, NodeError, run, umount_below

NODE_IP = "10.250.0.2"
POD_CIDR = "10.244.0.0/24"
API_PORT = 6443  # the API server's port as seen from inside the node


def _cni_conf() -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": "vmupdate-node",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=1)


@dataclass
class Node:
    name: str
    sandbox: Sandbox
    workdir: Path
    netns: Netns
    containerd: Containerd | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    shared_paths: list[Path] = field(default_factory=list)
    _stopped: bool = False

    @classmethod
    def start(cls, sandbox: Sandbox, workdir: Path, *, timeout: float = 120,
              taints: tuple[str, ...] = ()) -> Node:
        """Bring the node up and return once it is Ready."""
        assert sandbox.ca is not None, "a sandbox started here (its CA signs the node's certs)"
        netns = Netns.create()
        node = cls(name=netns.name, sandbox=sandbox, workdir=workdir, netns=netns)
        t0 = time.monotonic()
        try:
            node._network()
            node._api_forwarder()
            node._kubernetes_endpoints()
            node.containerd = Containerd.start(workdir, netns)
            node.timings["containerd"] = time.monotonic() - t0
            (workdir / "cni" / "10-vmupdate-bridge.conflist").write_text(_cni_conf())
            node._scheduler()
            node._kube_proxy()
            node._kubelet(taints)
            node.wait_ready(t0 + timeout)
            node.timings["ready"] = time.monotonic() - t0
        except BaseException:
            node.stop()
            raise
        return node

    # ------------------------------------------------------------------ pieces

    def _network(self) -> None:
        ns = self.netns
        # A veth pair with both ends inside (no dummy module on these kernels): node0 holds
        # the node's address and carries the default route.
        ns.exec("ip", "link", "add", "node0", "type", "veth", "peer", "name", "node0-peer")
        ns.exec("ip", "addr", "add", f"{NODE_IP}/24", "dev", "node0")
        ns.exec("ip", "link", "set", "node0-peer", "up")
        ns.exec("ip", "link", "set", "node0", "up")
        # A default route, as every node has (the kubelet picks its address by it); it leads
        # nowhere outside the namespace.
        ns.exec("ip", "route", "add", "default", "dev", "node0")
        ns.exec("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def _launch(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.workdir / "logs" / f"{name}.log")
        self.processes.append(proc)
        proc.start(die_with_parent=True)
        return proc

    def _api_forwarder(self) -> None:
        socat = shutil.which("socat")
        if socat is None:
            raise NodeError("socat not installed: run e2e/node/provision.sh")
        run_dir = RUN_ROOT / self.netns.name
        run_dir.mkdir(parents=True, exist_ok=True)
        sock = run_dir / "api.sock"
        host_port = self.sandbox.server.rsplit(":", 1)[1]
        self._launch("api-forward-host", [
            socat, f"UNIX-LISTEN:{sock},fork,unlink-early", f"TCP:127.0.0.1:{host_port}"])
        self._launch("api-forward-node", self.netns.argv(
            socat, f"TCP-LISTEN:{API_PORT},fork,reuseaddr", f"UNIX-CONNECT:{sock}"))

    def _kubernetes_endpoints(self) -> None:
        """The ``kubernetes`` Service's endpoint: the forwarder on the node's address (the
        sandbox's API server keeps none: it listens on the host's loopback only)."""
        skip = {"endpointslice.kubernetes.io/skip-mirror": "true"}
        port = {"name": "https", "port": API_PORT, "protocol": "TCP"}
        docs = [
            {"apiVersion": "v1", "kind": "Endpoints",
             "metadata": {"name": "kubernetes", "namespace": "default", "labels": skip},
             "subsets": [{"addresses": [{"ip": NODE_IP}], "ports": [port]}]},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kubernetes", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "kubernetes",
                                     "endpointslice.kubernetes.io/managed-by": "vmupdate-e2e"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
             "ports": [port]},
        ]
        self.sandbox.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                             input=yaml.safe_dump_all(docs), check=True)

    def _kubeconfig(self, user: str, groups: list[str], server: str) -> Path:
        assert self.sandbox.ca is not None
        cert, key = self.sandbox.ca.issue(user, groups)
        safe = user.replace(":", "-")
        return _write(self.workdir / f"{safe}.kubeconfig",
                      make_kubeconfig(server, self.sandbox.ca_pem, user, cert, key).encode())

    def _scheduler(self) -> None:
        kc = self._kubeconfig("system:kube-scheduler", [], self.sandbox.server)
        self._launch("kube-scheduler", [
            str(find_binary("kube-scheduler", self.sandbox.bin_dir)),
            f"--kubeconfig={kc}", "--authentication-kubeconfig=" + str(kc),
            "--authorization-kubeconfig=" + str(kc), "--leader-elect=false",
            "--secure-port=0", "--v=1"])

    def _kube_proxy(self) -> None:
        kc = self._kubeconfig("system:kube-proxy", [], f"https://127.0.0.1:{API_PORT}")
        conf = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kc)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": self.name,
            "bindAddress": NODE_IP,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # nf_conntrack_max and its timeouts are the host's (not per namespace): leave them.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }
        path = _write(self.workdir / "kube-proxy.yaml", yaml.safe_dump(conf).encode(), 0o644)
        self._launch("kube-proxy", self.netns.argv(
            str(find_binary("kube-proxy", self.sandbox.bin_dir)), f"--config={path}", "--v=1"))

    def _kubelet(self, taints: tuple[str, ...]) -> None:
        assert self.containerd is not None
        kc = self._kubeconfig(f"system:node:{self.name}", ["system:nodes"],
                              f"https://127.0.0.1:{API_PORT}")
        ca = _write(self.workdir / "ca.crt", self.sandbox.ca_pem, 0o644)
        root = self.workdir / "kubelet"
        conf = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine kind has a cgroup v1 (hybrid) hierarchy.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd.socket}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca)}},
            "authorization": {"mode": "Webhook"},
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "failSwapOn": False,
            # No CAP_SYS_RESOURCE here: leave the host's rlimits and the QoS cgroups alone.
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": [],
            "localStorageCapacityIsolation": False,
            "evictionHard": {},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "resolvConf": "/etc/resolv.conf",
            "podLogsDir": str(self.workdir / "pod-logs"),
            "serializeImagePulls": False,
            "registerWithTaints": [
                dict(zip(("key", "value", "effect"),
                         t.replace("=", ":").split(":"), strict=True)) for t in taints],
        }
        path = _write(self.workdir / "kubelet.yaml", yaml.safe_dump(conf).encode(), 0o644)
        self._launch("kubelet", self.netns.argv(
            str(find_binary("kubelet", self.sandbox.bin_dir)), f"--config={path}",
            f"--kubeconfig={kc}", f"--root-dir={root}", f"--hostname-override={self.name}",
            f"--node-ip={NODE_IP}", "--v=1"))

    # ------------------------------------------------------------------ state

    def wait_ready(self, deadline: float) -> None:
        while True:
            res = self.sandbox.kubectl("get", "node", self.name, "-o",
                                       "jsonpath={.status.conditions[?(@.type=='Ready')].status}")
            if res.returncode == 0 and res.stdout.strip() == "True":
                return
            for p in self.processes:
                if p.exited() is not None:
                    raise NodeError(f"{p.name} exited:\n{p.tail()}")
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.name} not Ready: {res.stdout}{res.stderr}\n"
                                f"kubelet:\n{self.processes[-1].tail()}")
            time.sleep(0.5)

    def share_host_path(self, path: Path) -> None:
        """Make ``path`` a shared mount, as a hostPath with ``mountPropagation`` needs (runc
        refuses one on a private mount). On systemd hosts ``/`` is shared and every path
        qualifies; this machine's ``/`` is private, so the path is bound onto itself and
        shared, until :meth:`stop`."""
        path.mkdir(parents=True, exist_ok=True)
        run(["mount", "--bind", str(path), str(path)])
        self.shared_paths.append(path)
        run(["mount", "--make-shared", str(path)])

    def pod_logs(self, namespace: str, pod_prefix: str, lines: int = 60) -> str:
        """The containers' logs of the pods whose name starts with ``pod_prefix``, read from
        the kubelet's log folder (the API server cannot reach this kubelet for
        ``kubectl logs``: it listens inside the node's network namespace)."""
        out = []
        for log in sorted((self.workdir / "pod-logs").glob(f"{namespace}_{pod_prefix}*/*/*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.parent.parent.name}/{log.parent.name}/{log.name}")
            out += [t.split(" ", 3)[-1] for t in tail]  # drop the CRI time/stream/tag prefix
        return "\n".join(out)

    def task_pid(self, container_id: str) -> int:
        """The host pid of a container's main process (``containerd://ID`` from a pod's
        status), from this node's containerd."""
        assert self.containerd is not None
        cid = container_id.removeprefix("containerd://")
        for line in self.containerd.ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise NodeError(f"no task for container {cid}")

    def import_image(self, archive: Path) -> None:
        assert self.containerd is not None
        self.containerd.import_image(archive)

    def stop(self) -> None:
        """Stop the kubelet first (no restarts), then every container, then the rest."""
        if self._stopped:
            return
        self._stopped = True
        errors = []
        for proc in reversed(self.processes):
            try:
                proc.stop(timeout=10)
            except NodeError as e:
                errors.append(str(e))
            if proc.name == "kubelet" and self.containerd is not None:
                with contextlib.suppress(Exception):
                    self.containerd.stop()
        if self.containerd is not None:
            self.containerd.stop()
        for path in reversed(self.shared_paths):
            umount_below(path)
        umount_below(self.workdir)
        self.netns.delete()
        if errors:
            raise NodeError("; ".join(errors))
