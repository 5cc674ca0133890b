"""What the handlers share for the operator's lifetime (kept in kopf's operator memo)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vmupdate_api.crd.vmupdate import VMRolloutStatus
from vmupdate_operator.agents import AgentPool
from vmupdate_operator.config import OperatorConfig
from vmupdate_operator.inventory import HostInventory
from vmupdate_operator.kube import VMUpdateHostWriter, VMUpdateStatusWriter
from vmupdate_operator.metrics import Metrics
from vmupdate_operator.ownership import Claim
from vmupdate_operator.reporting import EventSink
from vmupdate_operator.rollout import Rollout, RolloutDeps


class AgentsNotConfigured:
    """Stands in for the agent pool when no client certificate is configured."""

    async def client(self, host: str, endpoint: str) -> Any:
        raise RuntimeError("no agent TLS configured: pass --agent-ca-file, --agent-cert-file "
                           "and --agent-key-file (or the VMUPDATE_AGENT_* variables)")


@dataclass
class OperatorContext:
    config: OperatorConfig
    writer: VMUpdateStatusWriter
    records: VMUpdateHostWriter
    agents: AgentPool | AgentsNotConfigured
    metrics: Metrics
    api: Any  # the kubernetes_asyncio ApiClient (closed at cleanup)
    rollouts: dict[str, Rollout] = field(default_factory=dict)  # by VMUpdate uid

    def new_rollout(self, body: Any, hosts: Callable[[], Sequence[HostInventory]],
                    events: EventSink, claims: Callable[[], Sequence[Claim]] = tuple,
                    stored: Callable[[str], Sequence[VMRolloutStatus]] = lambda uid: ()
                    ) -> Rollout:
        c = self.config
        deps = RolloutDeps(writer=self.writer, records=self.records, agents=self.agents,
                           hosts=hosts, events=events, claims=claims, stored=stored,
                           metrics=self.metrics, stale_after=c.host_stale_after,
                           resync_s=c.resync_s, update_timeout_s=c.update_timeout_s,
                           deletion_wait_s=c.deletion_wait_s)
        return Rollout(body, deps)

    def wake_all(self) -> None:
        for rollout in self.rollouts.values():
            rollout.wake()
