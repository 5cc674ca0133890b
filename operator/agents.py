"""Clients of the node agents, one per endpoint, found through ``VMHost.status.endpoint``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from vmupdate_operator.agent_client import AgentClient, ClientTls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentTls:
    """The operator's side of the agents' mutual TLS (files, re-read on each new channel)."""

    ca_file: str
    cert_file: str
    key_file: str
    # The name to check an agent's serving certificate against; "{node}" is replaced by the
    # VMHost's name (for certificates issued to node names while endpoints are pod IPs).
    # None: the host in the endpoint.
    server_name: str | None = None

    def for_host(self, host: str) -> ClientTls:
        name = self.server_name.replace("{node}", host) if self.server_name else None
        return ClientTls(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                         server_name=name)


class AgentPool:
    """One client (one mTLS channel) per (host, endpoint); a new endpoint gets a new one."""

    def __init__(self, tls: AgentTls, *, call_timeout: float = 30.0) -> None:
        self.tls = tls
        self.call_timeout = call_timeout
        self._clients: dict[str, tuple[str, AgentClient]] = {}
        self._lock = asyncio.Lock()

    async def client(self, host: str, endpoint: str) -> AgentClient:
        async with self._lock:
            known = self._clients.get(host)
            if known is not None and known[0] == endpoint:
                return known[1]
            created = await AgentClient.connect(endpoint, self.tls.for_host(host),
                                                timeout=self.call_timeout)
            self._clients[host] = (endpoint, created)
        if known is not None:
            log.info("agent of %s moved from %s to %s", host, known[0], endpoint)
            await known[1].close()
        return created

    async def close(self) -> None:
        async with self._lock:
            clients = [c for _, c in self._clients.values()]
            self._clients.clear()
        for c in clients:
            await c.close()
