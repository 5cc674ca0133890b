"""A QMP session to one QEMU: qemu.qmp underneath, with what the agent needs on top.

- every command and every wait has a deadline: a hung QEMU gives a clear `QmpTimeout`,
  never a hang;
- the peer's pid comes from the socket (SO_PEERCRED), so the agent knows which process
  answered (the same pid after cpr-exec, the guard's watcher after a rollback);
- events are kept with QEMU's own timestamps, from which the guest pause is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, cast

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

from vmupdate_agent import fswatch, procfs

log = logging.getLogger(__name__)


class QmpError(RuntimeError):
    """A QMP command failed or the monitor could not be reached; the message says which."""


class QmpTimeout(QmpError):
    pass


class QmpSilent(QmpTimeout):
    """A QEMU accepts on its monitor (or not even that) but does not greet: hung or
    stopped."""


class QmpCommandError(QmpError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class Event:
    name: str
    # QEMU's own wall-clock timestamp of the event, in ns since the epoch.
    qemu_time_ns: int
    # When the agent received it (CLOCK_REALTIME, ns).
    seen_ns: int
    data: dict[str, Any] = field(default_factory=dict)


async def _connect_unix(sock: socket.socket, path: str) -> None:
    """Connect a non-blocking UNIX socket. A listener whose queue is full (nobody accepts:
    the QEMU is stopped or hung) makes connect() fail with EAGAIN; asyncio's sock_connect
    then reports success on a socket that is not connected, so retry here instead (the
    caller's timeout ends it)."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            await asyncio.sleep(0.005)


class QmpSession:
    def __init__(self, path: str, *, command_timeout: float = 10.0,
                 name: str = "vmupdate-agent") -> None:
        self.path = path
        self.command_timeout = command_timeout
        self._client = QMPClient(name)
        self._events: list[Event] = []
        self._event_cond = asyncio.Condition()
        self._pump: asyncio.Task[None] | None = None
        self.peer_pid: int = 0

    @classmethod
    async def open(cls, path: str, *, timeout: float = 5.0,
                   command_timeout: float = 10.0) -> QmpSession:
        session = cls(path, command_timeout=command_timeout)
        await session.connect(timeout)
        return session

    @classmethod
    async def open_retrying(cls, path: str, *, timeout: float, interval: float = 0.002,
                            command_timeout: float = 10.0,
                            silence_timeout: float | None = None) -> QmpSession:
        """Connect, retrying until `timeout`: for a socket a new QEMU is about to create.

        `silence_timeout`: a listener that accepts but does not greet for this long is a
        hung QEMU, not one still starting: raise QmpSilent at once instead of retrying."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        # Woken as the socket appears (QEMU binds it) rather than at the next poll: this
        # wait is inside the guest's pause when the new QEMU is a cpr-exec one.
        async with fswatch.FolderWatch(os.path.dirname(path) or ".") as appeared:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QmpTimeout(f"no QMP monitor answered at {path} within "
                                     f"{timeout:.1f}s" + (f" (last error: {last})" if last else ""))
                session = cls(path, command_timeout=command_timeout)
                wait = min(remaining, silence_timeout or 2.0)
                try:
                    await session.connect(wait)
                    return session
                except QmpTimeout as exc:
                    last = exc
                    await session.close()
                    if silence_timeout is not None and wait >= silence_timeout:
                        raise QmpSilent(str(exc)) from exc
                except QmpError as exc:
                    last = exc
                    await session.close()
                await appeared.changed(interval)

    async def connect(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        accepted = False
        try:
            async with asyncio.timeout(timeout):
                await _connect_unix(sock, self.path)
                accepted = True
                self.peer_pid = procfs.peer_pid(sock)
                await self._client.connect(sock)
        except TimeoutError as exc:
            sock.close()
            if not accepted:
                raise QmpTimeout(
                    f"QMP at {self.path} did not accept a connection within {timeout:.1f}s "
                    "(its listen queue is full: the QEMU is stopped or hung)") from exc
            raise QmpTimeout(f"QMP at {self.path} did not greet within {timeout:.1f}s") from exc
        except Exception as exc:
            sock.close()
            raise QmpError(f"cannot connect to QMP at {self.path}: {exc}") from exc
        self._pump = asyncio.create_task(self._pump_events(), name=f"qmp-events:{self.path}")

    async def _pump_events(self) -> None:
        async for message in self._client.events:
            msg = cast(dict[str, Any], message)
            ts = msg.get("timestamp", {})
            qemu_ns = int(ts.get("seconds", 0)) * 1_000_000_000 + int(
                ts.get("microseconds", 0)) * 1000
            event = Event(str(msg["event"]), qemu_ns, time.time_ns(), dict(msg.get("data", {})))
            async with self._event_cond:
                self._events.append(event)
                self._event_cond.notify_all()

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    @property
    def events(self) -> list[Event]:
        return list(self._events)

    def mark(self) -> int:
        """A position in the event history, to wait for events that come after it."""
        return len(self._events)

    async def wait_event(self, name: str, *, since: int = 0, timeout: float,
                         predicate: Any = None) -> Event:
        async def find() -> Event:
            async with self._event_cond:
                while True:
                    for ev in self._events[since:]:
                        if ev.name == name and (predicate is None or predicate(ev)):
                            return ev
                    await self._event_cond.wait()

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError as exc:
            raise QmpTimeout(f"no {name} event from {self.path} within {timeout:.1f}s") from exc

    async def cmd(self, command: str, args: dict[str, Any] | None = None, *,
                  timeout: float | None = None) -> Any:
        limit = self.command_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._client.execute(command, args), limit)
        except ExecuteError as exc:
            raise QmpCommandError(command, exc.error_class, str(exc.error.error.desc)
                                  ) from exc
        except TimeoutError as exc:
            raise QmpTimeout(f"QMP {command} got no answer from {self.path} within "
                             f"{limit:.1f}s (QEMU pid {self.peer_pid} hung?)") from exc
        except QmpError:
            raise
        except Exception as exc:
            raise QmpError(f"QMP {command} to {self.path}: connection lost ({exc!r})") from exc

    async def wait_disconnected(self, timeout: float) -> None:
        async def until_gone() -> None:
            while self._client.runstate == Runstate.RUNNING:
                await self._client.runstate_changed()

        try:
            await asyncio.wait_for(until_gone(), timeout)
        except TimeoutError as exc:
            raise QmpTimeout(f"QMP at {self.path} stayed connected for {timeout:.1f}s") from exc

    async def close(self) -> None:
        if self._client.runstate != Runstate.IDLE:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 2.0)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
            self._pump = None

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
