"""Before a deleted VMUpdate goes: which of its VM operations do agents still run?

The rollout loop of a deleted VMUpdate stops starting VMs and waits for its own tasks; this
check covers the rest -- an operator restarted during the deletion, or rows whose task was
gone -- by asking each agent about each operation id still in flight in status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmupdate_api.crd.vmupdate import IN_PROGRESS_VM_PHASES, VMRolloutStatus
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentError
from vmupdate_operator.inventory import HostInventory
from vmupdate_operator.rollout import AgentSource


async def still_running(rows: Sequence[VMRolloutStatus], hosts: Sequence[HostInventory],
                        agents: AgentSource) -> list[str]:
    """One line per operation that runs, or may run (its agent cannot say)."""
    by_name = {h.name: h for h in hosts}
    out: list[str] = []
    for row in rows:
        if row.phase not in IN_PROGRESS_VM_PHASES or not row.operation_id:
            continue
        where = f"{row.name} on {row.host} (operation {row.operation_id})"
        host = by_name.get(row.host)
        if host is None or not host.endpoint:
            out.append(f"{where}: its agent cannot be reached (no VMHost endpoint)")
            continue
        try:
            client: Any = await agents.client(host.name, host.endpoint)
            operation: pb.Operation = await client.get_operation(row.operation_id)
        except AgentError as exc:
            if exc.code.name == "NOT_FOUND":
                continue  # never reached the agent: nothing runs
            out.append(f"{where}: {exc.code.name}: {exc.details}")
            continue
        if operation.state != pb.OPERATION_STATE_DONE:
            out.append(f"{where}: still running")
    return out
