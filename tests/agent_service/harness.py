"""Run the real agent as a subprocess (`python -m vmupdate_agent.server`) and talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.agent_service.pki import Issued, Pki
from vmupdate_agent import faultpoints, procfs, workdirs
from vmupdate_operator.agent_client import AgentClient, ClientTls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AgentProcess:
    config_path: Path
    config: dict[str, Any]
    log_path: Path
    pki: Pki
    port: int
    proc: asyncio.subprocess.Process | None = None
    clients: list[AgentClient] = field(default_factory=list)
    # Fault points the agent stops itself at (vmupdate_agent.faultpoints), once per start.
    stop_at: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def runtime_dir(self) -> Path:
        return Path(self.config["runtime_dir"])

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tls(self, who: Issued | None = None, *, ca: Path | None = None) -> ClientTls:
        who = who or self.pki.operator
        return ClientTls(ca_file=str(ca or self.pki.ca.path), cert_file=str(who.cert),
                         key_file=str(who.key))

    async def client(self, who: Issued | None = None, *, target: str | None = None,
                     **kwargs: Any) -> AgentClient:
        c = await AgentClient.connect(target or self.target, self.tls(who), **kwargs)
        self.clients.append(c)
        return c

    async def start(self, *, ready_timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.returncode is not None
        with open(self.log_path, "ab") as log:
            log.write(f"--- agent start {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vmupdate_agent.server", "--config",
                str(self.config_path), "--log-level", "DEBUG",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, faultpoints.ENV: ",".join(self.stop_at)})
        probe = await AgentClient.connect(self.target, self.tls())
        try:
            waiter = asyncio.create_task(probe.wait_ready(timeout=ready_timeout))
            exited = asyncio.create_task(self.proc.wait())
            done, _ = await asyncio.wait({waiter, exited}, timeout=ready_timeout + 5,
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
                raise RuntimeError(f"agent exited ({self.proc.returncode}) or did not get "
                                   f"ready:\n{self.log()[-4000:]}")
            exited.cancel()
            waiter.result()
        finally:
            await probe.close()

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; the exit code (SIGKILL after `timeout`)."""
        for c in self.clients:
            await c.close()
        self.clients.clear()
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise RuntimeError(f"agent ignored SIGTERM for {timeout}s:\n{self.log()[-4000:]}"
                               ) from None

    async def stopped_itself(self, timeout: float = 120.0) -> None:
        """Until the agent has stopped at one of its `stop_at` points (SIGSTOP: state T)."""
        deadline = time.monotonic() + timeout
        while procfs.stat_state(self.pid) != "T":
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"the agent exited before its fault point:\n"
                                   f"{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent did not reach {self.stop_at} in {timeout}s:\n"
                                   f"{self.log()[-3000:]}")
            await asyncio.sleep(0.005)

    async def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)


class AgentFactory:
    """Agents with their own state and runtime folders; stopped and cleaned at teardown."""

    def __init__(self, base: Path, pki: Pki, guard: Path) -> None:
        self.base = base
        self.pki = pki
        self.guard = guard
        self.agents: list[AgentProcess] = []
        self.runtime_dirs: list[Path] = []

    def make(self, *, socket_globs: list[str], runtime_parent: Path | None = None,
             allowed_binary_dirs: list[str] | None = None, stop_at: tuple[str, ...] = (),
             **overrides: Any) -> AgentProcess:
        n = len(self.agents)
        # Short: sockets live below the runtime dir (sun_path has 108 bytes).
        parent = runtime_parent or self.base
        runtime = parent / f"rt-{secrets.token_hex(3)}"
        self.runtime_dirs.append(runtime)
        port = free_port()
        config: dict[str, Any] = {
            "node_name": "test-node",
            "socket_globs": socket_globs,
            "allowed_binary_dirs": allowed_binary_dirs or ["/nonexistent/allowed"],
            "state_dir": str(self.base / f"state{n}"),
            "runtime_dir": str(runtime),
            "listen_address": f"127.0.0.1:{port}",
            "tls": {"cert_file": str(self.pki.server.cert), "key_file": str(self.pki.server.key),
                    "client_ca_file": str(self.pki.ca.path)},
            "client_allowlist": list(Pki.ALLOWLIST),
            "guard_binary": str(self.guard),
        }
        config.update(overrides)
        path = self.base / f"agent{n}.yaml"
        path.write_text(yaml.safe_dump(config))
        agent = AgentProcess(path, config, self.base / f"agent{n}.log", self.pki, port,
                             stop_at=stop_at)
        self.agents.append(agent)
        return agent

    async def start(self, **kwargs: Any) -> AgentProcess:
        agent = self.make(**kwargs)
        await agent.start()
        return agent

    async def close(self) -> list[str]:
        problems = []
        for agent in self.agents:
            try:
                code = await agent.stop()
                if code not in (0, -signal.SIGKILL):
                    problems.append(f"agent exited {code}:\n{agent.log()[-3000:]}")
            except RuntimeError as exc:
                problems.append(str(exc))
        for d in self.runtime_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.agents.clear()
        self.runtime_dirs.clear()
        return problems


class CuttableProxy:
    """A TCP proxy in front of the agent whose connections the test can cut (a network
    failure as the client sees it: TLS and HTTP/2 pass through untouched)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cuts = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        """Reset every open connection (new ones are accepted again)."""
        self.cuts += 1
        self._reset()

    def _reset(self) -> None:
        for w in list(self._writers):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.close()
        self._writers.clear()

    async def close(self) -> None:
        self._reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def journal_files(agent: AgentProcess) -> list[str]:
    d = agent.state_dir / "operations"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def op_workdir(agent: AgentProcess, op_id: str) -> Path:
    """Where the agent keeps an operation's files (a short folder named after its id)."""
    return Path(workdirs.workdir(str(agent.runtime_dir), op_id))


def op_workdirs(agent: AgentProcess) -> list[str]:
    d = agent.runtime_dir / "ops"
    return sorted(os.listdir(d)) if d.is_dir() else []
