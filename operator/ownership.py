"""One owner per VM: which VMUpdate may act on a VM that several select. Pure.

Several VMUpdates may select one VM (overlapping selectors). Only its owner updates it; the
others show its row as Blocked, naming the owner, and say so in their Degraded condition
(reason OverlappingVMUpdate). The rule, applied in this order:

1. A VMUpdate with an operation in flight on the VM (row Preflight or Updating) owns it:
   a running operation is never taken over.
2. Otherwise a VMUpdate that already acted on the VM (started an operation on it: its row
   carries an operation id and is Updated, Failed or RolledBack) keeps it while it exists
   and selects it -- the VMUpdate that took the VM first keeps it.
3. Otherwise the oldest VMUpdate that selects the VM (``metadata.creationTimestamp``, then
   name, then uid) owns it.

A VMUpdate being deleted starts nothing, so it only counts under rule 1. Dry runs change
nothing: they neither own VMs nor are blocked. Every replica and every rollout computes the
same owner from the same objects (creation order does not change), so two VMUpdates never
both start a VM, and a VM is never moved back and forth between two targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from vmupdate_api.crd.vmhost import HostVM
from vmupdate_api.crd.vmupdate import IN_PROGRESS_VM_PHASES, VMPhase, VMRolloutStatus
from vmupdate_api.crd.vmupdate_spec import UpdateTarget, VMSelector, VMUpdateSpec
from vmupdate_operator.selection import host_matches, name_matches, runs_target, version_matches

Key = tuple[str, str]  # (host, VM name)
ACTED_PHASES = frozenset({VMPhase.UPDATED, VMPhase.FAILED, VMPhase.ROLLED_BACK})
_LAST = datetime.max.replace(tzinfo=None)


@dataclass(frozen=True)
class Claim:
    """What ownership needs to know of one VMUpdate."""

    uid: str
    name: str
    created: datetime | None
    selector: VMSelector
    target: UpdateTarget
    in_flight: frozenset[Key] = frozenset()
    acted: frozenset[Key] = frozenset()
    deleting: bool = False
    dry_run: bool = False

    def order(self) -> tuple[datetime, str, str]:
        created = self.created.replace(tzinfo=None) if self.created else _LAST
        return (created, self.name, self.uid)

    def selects(self, host: str, host_labels: Mapping[str, str], vm: HostVM) -> bool:
        """The planner's selection rule (planning step 2) for this VMUpdate."""
        key = (host, vm.name)
        return (host_matches(self.selector, host, host_labels)
                and name_matches(self.selector, vm.name)
                and (version_matches(self.selector, vm.qemu_version)
                     or runs_target(vm, self.target) or key in self.acted
                     or key in self.in_flight))

    def with_rows(self, rows: Iterable[VMRolloutStatus]) -> Claim:
        rows = list(rows)
        return self.with_keys(_keys(rows, in_flight=True), _keys(rows, in_flight=False))

    def with_keys(self, in_flight: Iterable[Key], acted: Iterable[Key]) -> Claim:
        return Claim(uid=self.uid, name=self.name, created=self.created,
                     selector=self.selector, target=self.target,
                     in_flight=frozenset(in_flight), acted=frozenset(acted),
                     deleting=self.deleting, dry_run=self.dry_run)


def _keys(rows: Iterable[VMRolloutStatus], *, in_flight: bool) -> Iterable[Key]:
    phases = IN_PROGRESS_VM_PHASES if in_flight else ACTED_PHASES
    return ((r.host, r.name) for r in rows if r.phase in phases and r.operation_id)


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def claim_from_body(body: Mapping[str, Any]) -> Claim | None:
    """A VMUpdate object as the API returns it, without the VMs it acted on (those are in
    its VMUpdateHost records: :meth:`Claim.with_keys`); None if its spec does not validate
    (the API server validated it, so only an older schema could) -- such an object owns
    nothing."""
    meta = body.get("metadata") or {}
    try:
        spec = VMUpdateSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError:
        return None
    return Claim(uid=str(meta.get("uid") or ""), name=str(meta.get("name") or ""),
                 created=_time(meta.get("creationTimestamp")), selector=spec.selector,
                 target=spec.target, deleting=bool(meta.get("deletionTimestamp")),
                 dry_run=spec.dry_run)


def owner(me: Claim, others: Sequence[Claim], host: str, host_labels: Mapping[str, str],
          vm: HostVM) -> Claim:
    """Who owns ``vm`` on ``host``, which ``me`` selects (see the module documentation)."""
    key = (host, vm.name)
    everyone = [me, *(c for c in others if c.uid != me.uid and not c.dry_run)]
    running = [c for c in everyone if key in c.in_flight]
    if running:
        return min(running, key=Claim.order)
    candidates = [c for c in everyone
                  if not c.deleting and (c is me or c.selects(host, host_labels, vm))]
    if not candidates:
        return me
    acted = [c for c in candidates if key in c.acted]
    return min(acted or candidates, key=Claim.order)


def blocked_message(owner_claim: Claim, key: Key) -> str:
    what = "is being updated by" if key in owner_claim.in_flight else "belongs to"
    return (f"blocked: {what} VMUpdate {owner_claim.name} (target QEMU "
            f"{owner_claim.target.version} at {owner_claim.target.binary}); a VM has one "
            "owner (see the operator's README); change the selectors so they do not overlap")
