"""Simulated nodes: each is what a DaemonSet pod would run on a real node -- the agent
(``vmupdate-agent --config FILE serve``) and the VMHost registrar sidecar
(``python -m vmupdate_agent.registration``) -- on loopback, with its own name, serving
certificate, journal, runtime folder and VM folder (its QMP socket glob)."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e.cluster.sandbox import ManagedProcess, free_port
from e2e.k8s.pki import OPERATOR_IDENTITY, REGISTRAR_IDENTITY, FleetPki
from e2e.rig import Rig
from vmupdate_agent import workdirs

QEMU_HOST_LABEL = "vmupdate.dev/qemu-host"
HEARTBEAT_S = 2.0


def venv_tool(name: str) -> str:
    """A console script of this virtualenv (next to the running interpreter)."""
    return str(Path(sys.executable).with_name(name))


@dataclass
class SimulatedNode:
    name: str
    vm_dir: Path
    runtime_dir: Path
    state_dir: Path
    config_path: Path
    logs: Path
    port: int
    pki: FleetPki
    agent: ManagedProcess | None = None
    registrar: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_config(self, rig: Rig, guard_binary: Path) -> None:
        serving = self.pki.agent(self.name)
        assert rig.sid.alt_binary is not None
        config = {
            "node_name": self.name,
            "socket_globs": [str(self.vm_dir / "*" / "qmp.sock")],
            # The target QEMUs of the tests live here inside the sid root (the VMs' root):
            # every build's folder, so a test can move a VM to any of them and back; and the
            # rig's wrappers, which take a host VM into the sid root.
            "allowed_binary_dirs": sorted({str(Path(q).parent) for q in (
                rig.sid.alt_binary, rig.sid.binary, rig.trixie.binary,
                rig.trixie_backports.binary)} | {str(rig.share / "bin")}),
            "state_dir": str(self.state_dir),
            "runtime_dir": str(self.runtime_dir),
            "listen_address": self.endpoint,
            "tls": {"cert_file": str(serving.cert), "key_file": str(serving.key),
                    "client_ca_file": str(self.pki.ca_cert)},
            "client_roles": {"operator": [OPERATOR_IDENTITY],
                             "registrar": [REGISTRAR_IDENTITY]},
            "guard_binary": str(guard_binary),
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> None:
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        self.start_agent()
        self.start_registrar()

    def start_agent(self) -> None:
        self.agent = ManagedProcess(
            f"agent-{self.name}",
            [venv_tool("vmupdate-agent"), "--config", str(self.config_path), "--verbose",
             "serve"],
            self.logs / f"agent-{self.name}.log")
        self.agent.start(die_with_parent=True)

    def start_registrar(self) -> None:
        assert self.registrar is None or self.registrar.exited() is not None
        self.registrar = ManagedProcess(
            f"registrar-{self.name}",
            [sys.executable, "-m", "vmupdate_agent.registration", "--agent", self.endpoint,
             "--ca-file", str(self.pki.ca_cert), "--cert-file", str(self.pki.registrar.cert),
             "--key-file", str(self.pki.registrar.key), "--endpoint", self.endpoint,
             "--interval", str(HEARTBEAT_S), "--label", f"{QEMU_HOST_LABEL}=true",
             "--label", f"e2e.vmupdate.dev/node={self.name}"],
            self.logs / f"registrar-{self.name}.log")
        self.registrar.start(die_with_parent=True)

    def stop(self) -> list[str]:
        problems = []
        for proc in (self.registrar, self.agent):
            if proc is None:
                continue
            try:
                proc.stop(60)
            except Exception as exc:
                problems.append(f"{proc.name}: {exc}")
        return problems

    def stop_registrar(self) -> None:
        """Heartbeats stop (the VMHost goes stale); the agent keeps serving."""
        if self.registrar is not None:
            self.registrar.stop(10)

    def kill_agent(self) -> None:
        if self.agent is not None and self.agent.popen is not None:
            self.agent.popen.send_signal(signal.SIGKILL)
            self.agent.popen.wait(10)

    def journal(self) -> dict[str, dict[str, object]]:
        """The agent's operation journal: operation id -> record."""
        folder = self.state_dir / "operations"
        if not folder.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}

    def logs_tail(self, lines: int = 40) -> str:
        parts = []
        for proc in (self.agent, self.registrar):
            if proc is not None:
                parts.append(f"--- {proc.name} ---\n{proc.tail(lines)}")
        return "\n".join(parts)


@dataclass
class Fleet:
    nodes: dict[str, SimulatedNode]
    vm_root: Path

    def node(self, name: str) -> SimulatedNode:
        return self.nodes[name]

    def journals(self) -> dict[str, dict[str, dict[str, object]]]:
        return {name: node.journal() for name, node in self.nodes.items()}

    def stop(self) -> list[str]:
        problems = []
        for node in self.nodes.values():
            problems += node.stop()
            shutil.rmtree(node.runtime_dir, ignore_errors=True)
        shutil.rmtree(self.vm_root, ignore_errors=True)
        return problems


def make_fleet(names: list[str], *, rig: Rig, pki: FleetPki, workdir: Path,
               guard_binary: Path) -> Fleet:
    token = secrets.token_hex(3)
    vm_root = rig.vms_dir / f"k8s-{token}"
    nodes = {}
    for name in names:
        # As long as the agent allows (workdirs.MAX_RUNTIME_DIR, far longer than the default
        # /run/vmupdate): every update's sockets still fit in sun_path with the operator's ids.
        base = f"{rig.share}/at/k8s-{token}-{name[-1]}-"
        runtime = Path(base + "r" * (workdirs.MAX_RUNTIME_DIR - len(base)))
        node = SimulatedNode(name=name, vm_dir=vm_root / name, runtime_dir=runtime,
                             state_dir=workdir / name / "state",
                             config_path=workdir / name / "agent.yaml", logs=workdir / "logs",
                             port=free_port(), pki=pki)
        node.config_path.parent.mkdir(parents=True, exist_ok=True)
        node.write_config(rig, guard_binary)
        nodes[name] = node
    return Fleet(nodes, vm_root)


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll a zero-argument callable until it returns true (synchronous fixtures only)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
