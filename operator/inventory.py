"""What the operator knows about the hosts: VMHost objects read into typed inventories.

Pure: the handlers hand in VMHost bodies (from kopf's index), the planner reads
:class:`HostInventory` values. A host whose agent stopped refreshing its VMHost (stale
heartbeat) or never said where it listens is *unavailable*: its VMs are not started and do
not count as gone (their last known rows stay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from vmupdate_api.crd.meta import format_time
from vmupdate_api.crd.vmhost import HostVM, VMHostStatus

DEFAULT_STALE_AFTER = timedelta(seconds=60)


@dataclass(frozen=True)
class HostInventory:
    """One VMHost as the planner needs it."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    endpoint: str | None = None
    heartbeat: datetime | None = None
    vms: tuple[HostVM, ...] = ()
    # Why the status could not be read (then the host is treated as unavailable).
    problem: str | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> HostInventory:
        """A VMHost object (as the API returns it) read leniently: a status that does not
        validate makes the host unavailable rather than the operator fail."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        labels = dict(meta.get("labels") or {})
        raw_status = body.get("status") or {}
        try:
            status = VMHostStatus.model_validate(raw_status)
        except ValidationError as exc:
            return cls(name=name, labels=labels,
                       problem=f"its status does not validate ({exc.error_count()} errors)")
        return cls(name=name, labels=labels, endpoint=status.endpoint,
                   heartbeat=status.heartbeat_time, vms=tuple(status.vms))

    def vm(self, name: str) -> HostVM | None:
        return self._by_name.get(name)

    @cached_property
    def _by_name(self) -> dict[str, HostVM]:
        """The VMs by name (the first of a name, as a scan would find): a lookup per row of
        a fleet must not scan the host's VMs."""
        out: dict[str, HostVM] = {}
        for vm in self.vms:
            out.setdefault(vm.name, vm)
        return out


def unavailable_reason(host: HostInventory, now: datetime,
                       stale_after: timedelta = DEFAULT_STALE_AFTER) -> str | None:
    """Why the operator must not start updates on ``host`` now, or None when it may.

    Messages carry the heartbeat time, not its age, so they stay the same from one
    reconcile to the next (and do not rewrite status every second).
    """
    if host.problem is not None:
        return f"host {host.name} unavailable: {host.problem}"
    if host.heartbeat is None:
        return f"host {host.name} unavailable: its agent has not reported yet"
    if now - host.heartbeat > stale_after:
        return (f"host {host.name} unavailable: no agent heartbeat since "
                f"{format_time(host.heartbeat)} (stale after {stale_after.total_seconds():.0f}s);"
                " check the vmupdate agent on that node")
    if not host.endpoint:
        return f"host {host.name} unavailable: its agent has not published an endpoint"
    return None


def seen_after(host: HostInventory, moment: datetime | None) -> bool:
    """Whether the host's inventory was taken after ``moment`` (so it reflects it)."""
    return host.heartbeat is not None and (moment is None or host.heartbeat > moment)
