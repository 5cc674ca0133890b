"""The operator as a process (``vmupdate-operator``), so a test can SIGKILL it and start it
again, as a node failure or an OOM kill would."""

from __future__ import annotations

import signal
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2e.cluster.sandbox import ManagedProcess, free_port
from e2e.k8s.nodes import venv_tool
from e2e.k8s.pki import FleetPki

# Short enough that a restarted operator does not wait long for its dead predecessor's
# keep-alive to expire (kopf peering), long enough for keep-alives every few seconds.
PEERING_LIFETIME_S = 10
HOST_STALE_AFTER_S = 20


@dataclass
class OperatorProcess:
    pki: FleetPki
    logs: Path
    metrics_port: int = field(default_factory=free_port)
    priority: int | None = None
    runs: int = 0
    process: ManagedProcess | None = None

    def argv(self) -> list[str]:
        argv = [venv_tool("vmupdate-operator"),
                "--agent-ca-file", str(self.pki.ca_cert),
                "--agent-cert-file", str(self.pki.operator.cert),
                "--agent-key-file", str(self.pki.operator.key),
                # Each agent serves a certificate for its node (e2e/k8s/pki.py): the operator
                # checks the agent it reached is the node it meant.
                "--agent-server-name", "{node}",
                "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1",
                "--peering-lifetime", str(PEERING_LIFETIME_S),
                "--host-stale-after", str(HOST_STALE_AFTER_S),
                "--resync", "3", "--log-level", "INFO"]
        if self.priority is not None:
            argv += ["--priority", str(self.priority)]
        return argv

    def start(self) -> None:
        assert self.process is None or self.process.exited() is not None
        self.runs += 1
        self.process = ManagedProcess(f"operator-{self.runs}", self.argv(),
                                      self.logs / f"operator-{self.runs}.log")
        self.process.start(die_with_parent=True)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to the peering, tasks cut mid-call."""
        assert self.process is not None and self.process.popen is not None
        self.process.popen.send_signal(signal.SIGKILL)
        self.process.popen.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(30)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.exited() is None

    def log(self) -> str:
        parts = []
        for n in range(1, self.runs + 1):
            path = self.logs / f"operator-{n}.log"
            if path.exists():
                parts.append(f"--- operator run {n} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())
