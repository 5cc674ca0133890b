"""The rollout planner: from the spec, the hosts' inventories and the per-VM rows, the next rows
and the VMs to start now. Pure: no I/O, time comes in as ``now``.

One call is one reconcile step. The caller persists the returned rows (the started ones carry
their operation ids) *before* it asks any agent to act, so a restarted operator finds every
operation it may have started in status.

Rules, in the order they are applied:

1. A new generation (``observed_generation != generation``: any spec edit) is a new rollout,
   as with a Deployment: every row not in flight goes back to Pending, without its operation
   id (a new one, of the new generation, is made when it starts); a VM already on the
   (new) target is then Updated without an operation. Rows in flight keep their operation,
   which finishes; once it has, its row too goes back to Pending (its operation id is of an
   older generation). Editing the target back is the rollback, and works the same way.
2. Selection: a VM is selected when its host matches ``hostNames`` and ``hostSelector``
   (VMHost labels), its name matches a ``vmNames`` glob, and its QEMU version matches
   ``qemuVersions`` -- or it runs the target already, or this rollout already acted on it
   (an updated VM's version no longer matches ``qemuVersions: [10.0]``, yet it stays selected).
   A Pending VM that stops matching becomes Skipped.
3. Observation against the inventory: a Pending VM found on the target is Updated ("already
   runs the target"); an Updated VM found on another binary again (by an inventory taken
   after its update finished) is Pending again and gets the next attempt's operation id --
   up to ``MAX_ATTEMPTS`` updates per generation; then it is Failed (a target that never
   sticks, e.g. a wrapper path, must not update a VM again and again).
   A waiting row whose VM had an operation (finishedAt) is judged, and started, only on an
   inventory taken after that operation ended.
   A Pending VM missing from a fresh inventory, or whose VMHost is gone, is Skipped; it comes
   back (Pending) when an inventory taken after the skip lists it again. Nothing
   is concluded from an unavailable host (stale heartbeat, no endpoint): its rows stay.
   Rows in Preflight or Updating belong to their agent operation and are never changed here.
   One owner per VM (real rollouts, see ``ownership``): a Pending VM another VMUpdate owns
   is Blocked (its row names the owner); a Blocked VM whose owner let go is Pending again.
4. Halts (real rollouts only): a failure while fewer than ``canary`` VMs have been updated
   (CanaryFailed); an updated VM paused longer than ``pauseBudgetMs`` in this generation
   (PauseBudgetExceeded); with failurePolicy Halt, more than ``maxFailures`` failed VMs
   (FailureLimitExceeded). Halted: nothing new starts; running updates finish.
5. Starting, in (host, name) order, none while halted or ``paused``: only on available hosts,
   and (real rollouts) only VMs their host reports ready (not ready ones wait, and say why);
   while the canary phase lasts (fewer than ``canary`` VMs updated by this rollout) one VM
   at a time and nothing else in flight; otherwise up to ``maxParallel`` in flight across the
   cluster and ``maxParallelPerHost`` per host. Dry runs use the same limits, no canary.
6. At most ``MAX_VM_ROWS`` rows: VMs beyond that are not tracked (counted in ``dropped``).

A fleet's step costs what changed, not the fleet: :class:`Planner` (one per rollout) applies
the same rules host by host and remembers the hosts they left alone -- steps 1-3 while the
host's inventory, availability and rows are the same objects, step 5 while, in addition,
none of its VMs could start for the same reason -- and per-host counts for steps 4 and 5.
Its plan is always the one :func:`plan` makes from scratch (``tests/operator/
test_planner.py`` compares them on random fleets). Rows are immutable values, so "the same
object" is "unchanged".

Over 450 lines: one planner, whose rules (waves, per-host limits, canary, budgets, failure
policy, blocked VMs) read each other's results within one step and share the private step
functions and their per-host memories; split, one module would reach into the other's
internals.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from vmupdate_api.crd.conditions import Reason
from vmupdate_api.crd.constants import MAX_VM_ROWS
from vmupdate_api.crd.vmhost import HostVM
from vmupdate_api.crd.vmupdate import IN_PROGRESS_VM_PHASES, VMPhase, VMRolloutStatus
from vmupdate_api.crd.vmupdate_spec import FailurePolicy, VMUpdateSpec
from vmupdate_operator.inventory import (
    DEFAULT_STALE_AFTER,
    HostInventory,
    seen_after,
    unavailable_reason,
)
from vmupdate_operator.operation_ids import next_operation_id, parse_operation_id, vm_identity
from vmupdate_operator.ownership import Claim, blocked_message, owner
from vmupdate_operator.selection import host_matches, name_matches, runs_target, version_matches

Key = tuple[str, str]  # (host, VM name): a VM's name is unique on its host
HostRows = tuple[VMRolloutStatus, ...]  # one host's rows, by name

UPDATE_FAILURES = frozenset({VMPhase.FAILED, VMPhase.ROLLED_BACK})
FINISHED = frozenset({VMPhase.UPDATED, VMPhase.FAILED, VMPhase.ROLLED_BACK,
                      VMPhase.DRY_RUN_PASSED, VMPhase.DRY_RUN_FAILED})
WAITING = frozenset({VMPhase.PENDING, VMPhase.BLOCKED})  # not started, may start
MAX_ATTEMPTS = 3  # updates of one VM in one generation, each found off the target after

# Messages of rows this module writes (tests and the status builder compare against them).
ALREADY_ON_TARGET = "already runs the target"
HALTED = "not started: the rollout is halted"
PAUSED = "not started: spec.paused is true"
NOT_READY = ("not started: VM(s) not ready for an in-place update (each row says why; fix the "
             "VM's command line or wait until it is free)")


@dataclass(frozen=True)
class Halt:
    """Why no new VM may start (the rollout is Failed)."""

    reason: Reason
    message: str


@dataclass(frozen=True)
class Plan:
    rows: tuple[VMRolloutStatus, ...]
    """Every row after this step, sorted by (host, name)."""
    started: tuple[VMRolloutStatus, ...]
    """Rows this step moved to Preflight: persist them, then ask their agents."""
    halt: Halt | None
    canary_active: bool
    """Still in the canary phase (fewer than ``canary`` VMs updated by this rollout)."""
    waiting: tuple[str, ...]
    """Distinct reasons why Pending VMs were not started, in row order."""
    dropped: int
    """Selected VMs not tracked because status holds at most MAX_VM_ROWS rows."""
    hosts: tuple[tuple[str, tuple[VMRolloutStatus, ...]], ...] = ()
    """``rows`` host by host (from :class:`Planner`): a host's tuple is the same object as
    the previous step's when none of its rows changed, so a caller need not compare them."""


def key_of(row: VMRolloutStatus) -> Key:
    return (row.host, row.name)


def plan(*, uid: str, generation: int, observed_generation: int | None, spec: VMUpdateSpec,
         hosts: Sequence[HostInventory], rows: Sequence[VMRolloutStatus], now: datetime,
         stale_after: timedelta = DEFAULT_STALE_AFTER, hold: str | None = None,
         me: Claim | None = None, others: Sequence[Claim] = ()) -> Plan:
    """One reconcile step; see the module documentation for the rules.

    ``hold``: start nothing, for this reason (e.g. the VMUpdate is being deleted).
    ``me``, ``others``: this VMUpdate and every other one, for the one-owner rule (without
    ``me``, no VM is Blocked).
    """
    return Planner().plan(uid=uid, generation=generation,
                          observed_generation=observed_generation, spec=spec, hosts=hosts,
                          rows=rows, now=now, stale_after=stale_after, hold=hold, me=me,
                          others=others)


@dataclass(frozen=True)
class _Settled:
    """A host whose rows steps 1-3 left as they were: while its inventory, its
    availability and its rows stay the same objects, they leave them so again."""

    inventory: HostInventory | None
    unavailable: str | None
    rows: tuple[VMRolloutStatus, ...]  # by name


class Planner:
    """:func:`plan`, remembering between the steps of one rollout which hosts steps 1-3
    (generation, selection, observation, ownership) left unchanged, so that a step looks
    again only at the hosts whose inventory, availability or rows changed: a fleet's step
    costs what changed, not the fleet. The result is always the one :func:`plan` computes
    from scratch (``tests/operator/test_planner.py`` compares them on random fleets)."""

    def __init__(self) -> None:
        self._settled: dict[str, _Settled] = {}
        self._waited: dict[str, _Waited] = {}
        self._summaries: dict[str, _Summary] = {}
        self._context: tuple[object, ...] | None = None

    def plan(self, *, uid: str, generation: int, observed_generation: int | None,
             spec: VMUpdateSpec, hosts: Sequence[HostInventory],
             rows: Sequence[VMRolloutStatus], now: datetime,
             stale_after: timedelta = DEFAULT_STALE_AFTER, hold: str | None = None,
             me: Claim | None = None, others: Sequence[Claim] = (),
             by_host: Sequence[tuple[str, HostRows]] | None = None) -> Plan:
        """:func:`plan`; ``by_host``: ``rows`` host by host, each host's rows by name (as
        the last plan's ``hosts`` with the changes since): then ``rows`` is not read, and
        a host whose tuple is the one the last step left needs no look at all."""
        new_rollout = observed_generation != generation
        if by_host is None:
            groups: dict[str, dict[str, VMRolloutStatus]] = {}
            for row in rows:
                groups.setdefault(row.host, {}).setdefault(row.name, row)
            given = {h: tuple(g.values()) for h, g in groups.items()}
        else:
            given = dict(by_host)
        hosts_by_name = {h.name: h for h in hosts}
        listings: dict[str, list[HostInventory]] = {}
        for h in hosts:
            listings.setdefault(h.name, []).append(h)
        unavailable = {h.name: unavailable_reason(h, now, stale_after) for h in hosts}
        owning = me is not None and not spec.dry_run
        rivals = me is not None and owning and any(c.uid != me.uid and not c.dry_run
                                                   for c in others)
        context = (spec, generation, new_rollout, owning, me)
        if self._context is None or self._context != context:
            # other rules: look at every host again
            self._settled, self._waited, self._summaries = {}, {}, {}
        # Several VMUpdates selecting one VM, or two VMHosts of one name: from scratch.
        self._context = None if rivals or len(hosts_by_name) != len(hosts) else context
        tracked = sum(len(g) for g in given.values())
        dropped = 0
        out: dict[str, tuple[VMRolloutStatus, ...]] = {}
        for name in sorted(given.keys() | hosts_by_name.keys()):
            given_rows = given.get(name, ())
            inventory = hosts_by_name.get(name)
            settled = self._settled.get(name)
            if (self._context is not None and settled is not None
                    and settled.inventory is inventory
                    and settled.unavailable == unavailable.get(name)
                    and _same(settled.rows, given_rows)):
                out[name] = settled.rows
                continue
            group: dict[str, VMRolloutStatus] = {}
            for row in given_rows:
                group.setdefault(row.name, row)
            current = {(name, n): _reset_for_new_generation(r, generation, new_rollout)
                       for n, r in group.items()}
            current, host_dropped, listed = _observe(
                spec, listings.get(name, []), current, now,
                unavailable, tracked=tracked - len(current))
            tracked += len(current) - len(group)
            dropped += host_dropped
            current = _account_for_missing(current, listed, hosts_by_name, unavailable, now)
            if not owning:
                current = {k: _unblocked(r) for k, r in current.items()}
            elif not rivals:  # this VMUpdate owns every VM it selects
                current = {k: _unblocked(r) if _known(r, hosts_by_name) else r
                           for k, r in current.items()}
            host_rows = tuple(current[k] for k in sorted(current))
            if _same(given_rows, host_rows):
                host_rows = given_rows  # the same rows: the same tuple
            elif settled is not None and _same(settled.rows, host_rows):
                host_rows = settled.rows
            out[name] = host_rows
            if (self._context is not None and host_dropped == 0
                    and len(host_rows) == len(group)
                    and all(group.get(r.name) is r for r in host_rows)):
                self._settled[name] = _Settled(inventory, unavailable.get(name), host_rows)
            else:
                self._settled.pop(name, None)

        for memory in (self._settled, self._waited, self._summaries):
            if len(memory) > len(out):  # hosts gone (no VMHost and no rows): forgotten
                for gone in memory.keys() - out.keys():
                    del memory[gone]
        groups_out = sorted(out.items())
        if rivals:
            assert me is not None
            current = {key_of(r): r for _, rs in groups_out for r in rs}
            current = _assign_owners(current, me.with_rows(current.values()), others,
                                     hosts_by_name)
            groups_out = [(n, tuple(current[(n, r.name)] for r in rs)) for n, rs in groups_out]
        summaries = [self._summary(n, rs, spec, generation) for n, rs in groups_out]
        halt = None if spec.dry_run else _halt(spec, summaries)
        canary_active = not spec.dry_run and _canary_active(spec, summaries)
        if self._context is None:
            self._waited = {}
        new_hosts, started, waiting = _start(
            uid=uid, generation=generation, spec=spec, groups=groups_out, hosts=hosts_by_name,
            flights=[(n, h.in_flight) for (n, _), h in zip(groups_out, summaries, strict=True)],
            unavailable=unavailable, halt=halt, hold=hold, canary_active=canary_active,
            now=now, memo=self._waited if self._context is not None else None)
        return Plan(rows=tuple(itertools.chain.from_iterable(rs for _, rs in new_hosts)),
                    started=tuple(started),
                    halt=halt, canary_active=canary_active, waiting=tuple(waiting),
                    dropped=dropped, hosts=tuple(new_hosts))

    def _summary(self, name: str, rows: HostRows, spec: VMUpdateSpec, generation: int
                 ) -> _Summary:
        """What steps 4 and 5 need of a host's rows (remembered while they are the same)."""
        before = self._summaries.get(name) if self._context is not None else None
        if before is not None and before.rows is rows:
            return before
        summary = _summarize(rows, spec, generation)
        if self._context is not None:
            self._summaries[name] = summary
        return summary


def _known(row: VMRolloutStatus, hosts: dict[str, HostInventory]) -> bool:
    """The VM's host lists it now (the one-owner rule looks only at such VMs)."""
    host = hosts.get(row.host)
    return host is not None and host.vm(row.name) is not None


# --- step 1: a new generation ---------------------------------------------------------------


def superseded(row: VMRolloutStatus, generation: int, new_rollout: bool) -> bool:
    """The row belongs to an earlier rollout (see rule 1)."""
    if row.phase in IN_PROGRESS_VM_PHASES:
        return False  # its operation finishes first
    if new_rollout:
        return row.phase != VMPhase.PENDING or row.operation_id is not None
    if row.phase not in FINISHED:
        return False
    ref = parse_operation_id(row.operation_id)
    return ref is not None and ref.generation != generation


def _reset_for_new_generation(row: VMRolloutStatus, generation: int, new_rollout: bool
                              ) -> VMRolloutStatus:
    if not superseded(row, generation, new_rollout):
        return row
    # finished_at stays: until an inventory taken after it, the VM's QEMU is not known.
    return row.model_copy(update={
        "phase": VMPhase.PENDING, "operation_id": None, "started_at": None,
        "pid_before": None, "pid_after": None, "to_version": None,
        "mode": None, "pause_ms": None,
        "message": f"generation {generation}: a new rollout"})


# --- steps 2 and 3: selection and observation -----------------------------------------------


def _observe(spec: VMUpdateSpec, hosts: Iterable[HostInventory],
             current: dict[Key, VMRolloutStatus], now: datetime,
             unavailable: dict[str, str | None], *, tracked: int = 0
             ) -> tuple[dict[Key, VMRolloutStatus], int, set[Key]]:
    """``tracked``: rows kept beside ``current`` (they count towards MAX_VM_ROWS)."""
    out = dict(current)
    listed: set[Key] = set()
    dropped = 0
    for host in hosts:
        host_ok = host_matches(spec.selector, host.name, host.labels)
        for vm in host.vms:
            key = (host.name, vm.name)
            listed.add(key)
            row = out.get(key)
            if (row is not None and row.uuid and vm.uuid and row.uuid != vm.uuid
                    and row.phase not in IN_PROGRESS_VM_PHASES):
                row = None  # another VM now carries this name: it is a new VM to us
            acted_on = row is not None and row.phase not in (VMPhase.PENDING, VMPhase.SKIPPED)
            selected = host_ok and name_matches(spec.selector, vm.name) and (
                version_matches(spec.selector, vm.qemu_version)
                or runs_target(vm, spec.target) or acted_on)
            if not selected:
                if row is not None and row.phase in WAITING:
                    out[key] = _skipped(row, "no longer matches spec.selector", now)
                continue
            if row is None:
                if key not in out and len(out) + tracked >= MAX_VM_ROWS:
                    dropped += 1
                    continue
                row = VMRolloutStatus(host=host.name, name=vm.name, uuid=vm.uuid,
                                      from_version=vm.qemu_version)
            out[key] = _observed(row, vm, host, spec, now,
                                 host_available=unavailable.get(host.name) is None)
    return out, dropped, listed


def _observed(row: VMRolloutStatus, vm: HostVM, host: HostInventory, spec: VMUpdateSpec,
              now: datetime, *, host_available: bool) -> VMRolloutStatus:
    if row.phase in IN_PROGRESS_VM_PHASES:
        return row  # its agent operation decides
    on_target = runs_target(vm, spec.target)
    if row.phase == VMPhase.SKIPPED and not seen_after(host, row.finished_at):
        return row  # listed by an inventory older than the skip: not back yet
    if row.phase in WAITING and not seen_after(host, row.finished_at):
        return row  # its last operation ended after this inventory: wait for a newer one
    if row.phase in (VMPhase.PENDING, VMPhase.SKIPPED, VMPhase.BLOCKED):
        if on_target:
            return row.model_copy(update={
                "phase": VMPhase.UPDATED, "uuid": vm.uuid or row.uuid,
                "to_version": vm.qemu_version, "pid_after": vm.pid, "finished_at": now,
                "message": ALREADY_ON_TARGET})
        return _with(row, {
            "phase": VMPhase.BLOCKED if row.phase == VMPhase.BLOCKED else VMPhase.PENDING,
            "uuid": vm.uuid or row.uuid, "from_version": vm.qemu_version,
            "message": None if row.phase == VMPhase.SKIPPED else row.message})
    if (row.phase == VMPhase.UPDATED and not on_target and host_available
            and seen_after(host, row.finished_at)):
        ref = parse_operation_id(row.operation_id)
        if ref is not None and ref.attempt + 1 >= MAX_ATTEMPTS:
            # Not a person putting it back now and then: every update "fails to stick".
            return row.model_copy(update={
                "phase": VMPhase.FAILED, "finished_at": now,
                "message": f"runs {_describe(vm)} after each of {MAX_ATTEMPTS} updates to "
                           f"{spec.target.binary}; not updating it again: spec.target.binary "
                           "must be the path the updated QEMU runs as (not a wrapper that "
                           "execs another binary)"})
        return row.model_copy(update={
            "phase": VMPhase.PENDING, "from_version": vm.qemu_version, "to_version": None,
            "pid_before": None, "pid_after": None, "pause_ms": None, "mode": None,
            "started_at": None, "finished_at": None,
            "message": f"runs {_describe(vm)} again after its update; updating it again"})
    return row


def _with(row: VMRolloutStatus, update: dict[str, object]) -> VMRolloutStatus:
    """``row`` with ``update`` -- the same object when nothing changes (a fleet's waiting
    rows are looked at every step: copying each one is most of a step's work)."""
    for name, value in update.items():
        if getattr(row, name) != value:
            return row.model_copy(update=update)
    return row


def _describe(vm: HostVM) -> str:
    return " ".join(p for p in (vm.binary, vm.qemu_version) if p) or "another QEMU"


def _account_for_missing(current: dict[Key, VMRolloutStatus], listed: set[Key],
                         hosts: dict[str, HostInventory], unavailable: dict[str, str | None],
                         now: datetime) -> dict[Key, VMRolloutStatus]:
    out = dict(current)
    for key, row in current.items():
        if key in listed or row.phase not in WAITING:
            continue
        if row.host not in hosts:
            out[key] = _skipped(row, f"host {row.host} has no VMHost any more", now)
        elif unavailable.get(row.host) is None:
            out[key] = _skipped(row, f"VM no longer found on host {row.host}", now)
    return out


def _assign_owners(current: dict[Key, VMRolloutStatus], me: Claim, others: Sequence[Claim],
                   hosts: dict[str, HostInventory]) -> dict[Key, VMRolloutStatus]:
    out = dict(current)
    for key, row in current.items():
        if row.phase not in WAITING:
            continue
        host = hosts.get(row.host)
        vm = host.vm(row.name) if host is not None else None
        if host is None or vm is None:
            continue  # nothing known now: it stays as it is
        who = owner(me, others, host.name, host.labels, vm)
        if who.uid == me.uid:
            out[key] = _unblocked(row)
        else:
            message = blocked_message(who, key)
            if row.phase != VMPhase.BLOCKED or row.message != message:
                out[key] = row.model_copy(update={"phase": VMPhase.BLOCKED, "message": message})
    return out


def _unblocked(row: VMRolloutStatus) -> VMRolloutStatus:
    if row.phase != VMPhase.BLOCKED:
        return row
    return row.model_copy(update={"phase": VMPhase.PENDING, "message": None})


def _skipped(row: VMRolloutStatus, why: str, now: datetime) -> VMRolloutStatus:
    return row.model_copy(update={"phase": VMPhase.SKIPPED, "message": why, "finished_at": now})


# --- step 4: halts --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Summary:
    """One host's rows as steps 4 and 5 count them."""

    rows: HostRows
    in_flight: int
    updated: int  # by this rollout (with an operation id)
    work: bool  # a row Pending or in flight
    failures: HostRows
    over_budget: VMRolloutStatus | None  # the first updated in this generation, over it


def _summarize(rows: HostRows, spec: VMUpdateSpec, generation: int) -> _Summary:
    strategy = spec.strategy
    over_budget = None
    for row in rows:
        if row.phase != VMPhase.UPDATED or not strategy.over_pause_budget(row.pause_ms):
            continue
        ref = parse_operation_id(row.operation_id)
        if ref is not None and ref.generation == generation:
            over_budget = row
            break
    return _Summary(
        rows=rows, in_flight=sum(r.phase in IN_PROGRESS_VM_PHASES for r in rows),
        updated=sum(r.phase == VMPhase.UPDATED and r.operation_id is not None for r in rows),
        work=any(r.phase == VMPhase.PENDING or r.phase in IN_PROGRESS_VM_PHASES for r in rows),
        failures=tuple(r for r in rows if r.phase in UPDATE_FAILURES), over_budget=over_budget)


def _canary_active(spec: VMUpdateSpec, hosts: Sequence[_Summary]) -> bool:
    return (sum(h.updated for h in hosts) < spec.strategy.canary
            and any(h.work for h in hosts))


def _where(row: VMRolloutStatus) -> str:
    return f"{row.name} on {row.host}"


RETRY_HINT = ("to retry, fix the cause, then change the spec (a new generation retries "
              "failed VMs), e.g. set spec.paused to true and back to false")


def _halt(spec: VMUpdateSpec, hosts: Sequence[_Summary]) -> Halt | None:
    strategy = spec.strategy
    failures = [r for h in hosts for r in h.failures]
    if failures and strategy.canary > 0 and sum(h.updated for h in hosts) < strategy.canary:
        first = failures[0]
        return Halt(Reason.CANARY_FAILED,
                    f"canary VM {_where(first)} failed: {first.message or first.phase.value}; "
                    f"{RETRY_HINT}")
    row = next((h.over_budget for h in hosts if h.over_budget is not None), None)
    if row is not None:
        return Halt(Reason.PAUSE_BUDGET_EXCEEDED,
                    f"{_where(row)} was paused {strategy.format_ms(row.pause_ms or 0)} ms, "
                    f"over pauseBudgetMs "
                    f"{strategy.pause_budget_ms} (the VM itself is updated); to go on, "
                    "raise strategy.pauseBudgetMs or make the guests pause less")
    if strategy.failure_policy == FailurePolicy.HALT and len(failures) > strategy.max_failures:
        names = ", ".join(_where(r) for r in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        return Halt(Reason.FAILURE_LIMIT_EXCEEDED,
                    f"{len(failures)} VM(s) failed ({names}{more}), more than maxFailures "
                    f"{strategy.max_failures}; {RETRY_HINT}")
    return None


# --- step 5: starting -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Waited:
    """A host none of whose Pending rows could start (and why): while its rows, its
    inventory and the reason stay the same, its rows come out the same again."""

    rows_in: tuple[VMRolloutStatus, ...]
    inventory: HostInventory | None
    unavailable: str | None
    held: str
    rows_out: tuple[VMRolloutStatus, ...]
    whys: tuple[str, ...]


def _same(a: Sequence[VMRolloutStatus], b: Sequence[VMRolloutStatus]) -> bool:
    return a is b or (len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True)))


def _start(*, uid: str, generation: int, spec: VMUpdateSpec,
           groups: Sequence[tuple[str, tuple[VMRolloutStatus, ...]]],
           hosts: dict[str, HostInventory], unavailable: dict[str, str | None],
           halt: Halt | None, hold: str | None, canary_active: bool, now: datetime,
           flights: Sequence[tuple[str, int]], memo: dict[str, _Waited] | None = None
           ) -> tuple[list[tuple[str, tuple[VMRolloutStatus, ...]]], list[VMRolloutStatus],
                      list[str]]:
    """Step 5 over the rows of each host in turn (``groups``, in host order). ``memo``: the
    hosts an earlier step held, to reuse while nothing of theirs changed."""
    strategy = spec.strategy
    per_host: Counter[str] = Counter(dict(flights))  # rows in flight, by host
    in_flight = sum(per_host.values())
    limit = 1 if canary_active else strategy.max_parallel
    saturated = ("waiting for the canary to finish" if canary_active
                 else f"waiting: {limit} VM(s) in flight (strategy.maxParallel)")
    done: list[tuple[str, tuple[VMRolloutStatus, ...]]] = []
    out: list[VMRolloutStatus] = []  # of the host at hand
    started: list[VMRolloutStatus] = []
    waiting: list[str] = []
    whys: list[str] = []  # of the host at hand, in row order

    def why(reason: str) -> None:
        whys.append(reason)
        if reason not in waiting:
            waiting.append(reason)

    def wait(row: VMRolloutStatus, reason: str) -> None:
        why(reason)
        out.append(row if row.message == reason else row.model_copy(update={"message": reason}))

    for name, rows in groups:
        # Nothing of this host can start: the same rows come out as the last time.
        held = (HALTED if halt is not None else hold if hold is not None
                else PAUSED if spec.paused else saturated if in_flight >= limit else None)
        host = hosts.get(name)
        before = memo.get(name) if memo is not None else None
        if (held is not None and before is not None and before.held == held
                and before.inventory is host and before.unavailable == unavailable.get(name)
                and _same(before.rows_in, rows)):
            done.append((name, before.rows_out))
            for reason in before.whys:
                why(reason)
            continue
        out, whys = [], []
        for row in rows:
            if row.phase != VMPhase.PENDING:
                out.append(row)
                continue
            vm = host.vm(row.name) if host is not None else None
            if halt is not None:
                wait(row, HALTED)
            elif hold is not None:
                wait(row, hold)
            elif spec.paused:
                wait(row, PAUSED)
            elif unavailable.get(row.host) is not None or vm is None:
                wait(row, unavailable.get(row.host) or f"host {row.host} does not list the VM")
            elif host is not None and not seen_after(host, row.finished_at):
                wait(row, f"waiting for an inventory of {row.host} taken after the VM's last "
                          "operation")
            elif not vm.ready and not spec.dry_run:
                # Its agent would refuse it; starting it would only count a failure (and may
                # halt the rollout). It starts once its host reports it ready. A dry run
                # still asks: its preflight report is the detail the user needs.
                why(NOT_READY)
                reasons = "; ".join(vm.not_ready_reasons) or "its agent gave no reason"
                message = f"not started: not ready for an in-place update: {reasons}"
                out.append(row if row.message == message
                           else row.model_copy(update={"message": message}))
            elif in_flight >= limit:
                wait(row, saturated)
            elif per_host[row.host] >= strategy.max_parallel_per_host:
                wait(row, f"waiting: {strategy.max_parallel_per_host} VM(s) in flight on "
                          f"{row.host} (strategy.maxParallelPerHost)")
            else:
                begun = _begin(row, vm, uid=uid, generation=generation, spec=spec, now=now,
                               canary=canary_active)
                in_flight += 1
                per_host[row.host] += 1
                out.append(begun)
                started.append(begun)
        host_out = rows if _same(rows, out) else tuple(out)
        done.append((name, host_out))
        if memo is not None:
            if held is not None:
                memo[name] = _Waited(rows, host, unavailable.get(name), held, host_out,
                                     tuple(dict.fromkeys(whys)))
            else:
                memo.pop(name, None)
    return done, started, waiting


def _begin(row: VMRolloutStatus, vm: HostVM, *, uid: str, generation: int, spec: VMUpdateSpec,
           now: datetime, canary: bool) -> VMRolloutStatus:
    fields: dict[str, object] = {
        "phase": VMPhase.PREFLIGHT, "uuid": vm.uuid or row.uuid, "started_at": now,
        "finished_at": None, "pid_before": vm.pid, "pid_after": None,
        "from_version": vm.qemu_version, "to_version": None, "pause_ms": None, "mode": None,
    }
    if spec.dry_run:
        fields.update(operation_id=None, message="preflight requested from the agent")
    else:
        identity = vm_identity(row.host, row.name, vm.uuid or row.uuid)
        fields.update(
            operation_id=next_operation_id(uid, generation, identity, row.operation_id),
            message="canary: update requested from the agent" if canary
            else "update requested from the agent")
    return row.model_copy(update=fields)
