"""One VMUpdate's convergence loop: plan, persist, call the agents, record what they say.

The loop runs in the VMUpdate's kopf daemon (one per object, only in the active replica).
Each step applies what the VM tasks reported, asks the pure planner for the next rows,
writes the rows that changed into their hosts' VMUpdateHost records (``records.py``) and
the VMUpdate's bounded status -- and only once those writes succeeded does it start tasks
for the rows the step moved to Preflight. So every operation id an agent may ever see is
recorded before the agent sees it; a restarted operator reads the records back (the
operator's index of VMUpdateHosts), follows every Preflight/Updating row by its operation id
(GetOperation, then the agent's stream), and never starts an operation that is not
recorded, nor one twice.

VM tasks never write status themselves: they post row changes to the loop, which applies
them in order and coalesces bursts of progress into one write. The loop is the only writer
of the object's status and records, so plain merge patches cannot lose each other's
changes.

Over 450 lines: one loop, the I/O of its steps (persist, call the agents, record) and the VM
tasks it runs share one state (the rows, the changes posted and not yet applied, the
tasks), which only this class touches; the pure parts live elsewhere (planning, status,
records, reporting, translate).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc
from pydantic import ValidationError

from vmupdate_api.crd.vmupdate import (
    IN_PROGRESS_VM_PHASES,
    VMPhase,
    VMRolloutStatus,
    VMUpdateStatus,
)
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator import planning, records, translate
from vmupdate_operator.agent_client import AgentError
from vmupdate_operator.inventory import DEFAULT_STALE_AFTER, HostInventory
from vmupdate_operator.kube import RecordWrite, StatusWriteError
from vmupdate_operator.metrics import Metrics
from vmupdate_operator.operation_ids import parse_operation_id
from vmupdate_operator.ownership import Claim, claim_from_body
from vmupdate_operator.planning import Key, key_of
from vmupdate_operator.reporting import EventSink, report
from vmupdate_operator.status import build_status, with_start_time

log = logging.getLogger(__name__)

RowChange = Callable[[VMRolloutStatus], VMRolloutStatus]
COALESCE_S = 0.05  # results arriving within this are written together
PROGRESS_S = 1.0  # progress alone is written at most this often (results at once)
DELETING = "not started: the VMUpdate is being deleted"


class StatusWriter(Protocol):
    async def write(self, name: str, status: VMUpdateStatus) -> None: ...


class RecordWriter(Protocol):
    async def write(self, record: RecordWrite) -> None: ...


RECORD_WRITES = 16  # VMUpdateHost writes of one step at once


class AgentApi(Protocol):
    """What a rollout needs of an agent client (``AgentClient`` has it)."""

    async def get_operation(self, operation_id: str, *, timeout: float | None = None
                            ) -> pb.Operation: ...

    async def update(self, request: pb.UpdateRequest, *,
                     on_event: Callable[[pb.OperationEvent], Any] | None = None,
                     timeout: float = 900.0) -> pb.UpdateResult: ...

    async def preflight(self, request: pb.PreflightRequest, *, timeout: float | None = None
                        ) -> pb.PreflightReport: ...


class AgentSource(Protocol):
    async def client(self, host: str, endpoint: str) -> Any: ...


def _not_started(row: VMRolloutStatus, generation: int) -> VMRolloutStatus:
    """A row whose operation never reached its agent before the spec changed."""
    return row.model_copy(update={
        "phase": VMPhase.PENDING, "operation_id": None, "started_at": None,
        "message": f"generation {generation}: a new rollout (the earlier one had not started "
                   "this VM)"})


def _replaced(rows: list[VMRolloutStatus], by_key: Mapping[Key, VMRolloutStatus],
              changed: set[Key]) -> list[VMRolloutStatus]:
    """``rows`` (sorted by key) with the ``changed`` ones taken from ``by_key``: found by
    bisection, so a change costs what it changed, not the fleet."""
    if len(by_key) != len(rows):  # duplicate keys (records read at start): every row
        return [by_key[key_of(r)] for r in rows]
    out = list(rows)
    for key in changed:
        i = bisect.bisect_left(out, key, key=key_of)
        if i == len(out) or key_of(out[i]) != key:
            return [by_key[key_of(r)] for r in rows]  # not sorted after all
        out[i] = by_key[key]
    return out


def utcnow() -> datetime:
    return datetime.now(UTC)


def backoff(initial: float = 1.0, cap: float = 30.0) -> Iterator[float]:
    delay = initial
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(delay * 2, cap)


@dataclass
class RolloutDeps:
    """Everything a rollout talks to; tests hand in fakes."""

    writer: StatusWriter
    records: RecordWriter
    agents: AgentSource
    hosts: Callable[[], Sequence[HostInventory]]
    events: EventSink
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], datetime] = utcnow
    stale_after: Any = DEFAULT_STALE_AFTER
    claims: Callable[[], Sequence[Claim]] = tuple
    """Every VMUpdate (as the one-owner rule sees it), this one included or not."""
    stored: Callable[[str], Sequence[VMRolloutStatus]] = lambda uid: ()
    """The records the VMUpdateHosts of the VMUpdate ``uid`` hold (read at start)."""
    resync_s: float = 10.0
    update_timeout_s: float = 900.0
    deletion_wait_s: float = 900.0


class Rollout:
    """The convergence loop of one VMUpdate (see the module documentation)."""

    def __init__(self, body: Mapping[str, Any], deps: RolloutDeps) -> None:
        self.body = body  # kopf's live view: always the latest spec and metadata
        self.deps = deps
        meta = body.get("metadata") or {}
        self.name = str(meta.get("name"))
        self.uid = str(meta.get("uid"))
        self.status: VMUpdateStatus | None = None  # as last written (or read at start)
        self.rows: list[VMRolloutStatus] = []  # every record, in (host, name) order
        self._by_key: dict[Key, VMRolloutStatus] = {}  # rows with the changes applied
        self._reported: dict[Key, VMRolloutStatus] = {}  # rows as last written
        self._written: dict[str, records.HostRows] = {}  # what each VMUpdateHost holds
        self._written_hosts: dict[str, planning.HostRows] = {}  # the same, as the plan's
        self._hosts: dict[str, planning.HostRows] = {}  # the adopted rows by host
        self._current: dict[str, planning.HostRows] = {}  # self.rows by host (the planner's)
        self._changes: list[tuple[Key, RowChange]] = []
        self._pending: dict[Key, list[RowChange]] = {}  # the same, by row (for row())
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._ended: set[Key] = set()  # rows whose task ended since the last step
        self._all_rows = True  # the first step looks at every row for tasks to follow
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._deleting = False
        self._spec_error: str | None = None
        self._progress_wake: asyncio.TimerHandle | None = None
        self._planner = planning.Planner()  # remembers the hosts a step need not look at

    # --- control -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Reconcile soon (the spec or an inventory changed)."""
        self._wake.set()

    def stop(self, *, deleting: bool) -> None:
        """Leave the loop: when ``deleting``, after the running VM operations finished;
        otherwise (operator exiting or standing by) at once -- the agents carry on and the
        next active operator follows their operations."""
        self._deleting = self._deleting or deleting
        self._stop.set()
        self._wake.set()

    @property
    def running(self) -> int:
        return sum(not t.done() for t in self._tasks.values())

    async def run(self) -> None:
        self._load()
        try:
            while not self._stop.is_set():
                await self.step()
                await self._sleep(self.deps.resync_s)
            if self._deleting:
                await self._drain()
        finally:
            await self._cancel_tasks()

    # --- one step ----------------------------------------------------------------------------

    def _load(self) -> None:
        raw = self.body.get("status")
        if raw:
            try:
                self.status = VMUpdateStatus.model_validate(dict(raw))
            except ValidationError as exc:
                # Not expected (the API server validated it). The counts are rebuilt.
                log.error("VMUpdate %s: status unreadable, rebuilding it: %s", self.name, exc)
        # A record the API server validated always parses; one that did not is rebuilt by
        # the planner (operation ids are deterministic, so agents still dedupe what ran).
        stored = sorted(self.deps.stored(self.uid), key=key_of)
        self._written = records.by_host(stored)
        self._adopt(stored)

    def _adopt(self, rows: list[VMRolloutStatus],
               hosts: Sequence[tuple[str, planning.HostRows]] = ()) -> None:
        """``rows`` (``hosts``: the same, host by host) are written: the loop's state from
        now on. Only the hosts whose rows are other objects than before are looked at."""
        self.rows = rows
        by_key = dict(self._reported)
        for name, host_rows in hosts:
            if self._hosts.get(name) is not host_rows:
                for r in host_rows:
                    by_key[key_of(r)] = r
        if not hosts or len(by_key) != len(rows):  # not the plan's, or rows left
            by_key = {key_of(r): r for r in rows}
        self._by_key = self._reported = by_key
        self._hosts = dict(hosts)
        self._current = dict(hosts)

    def _changed(self, hosts: Sequence[tuple[str, planning.HostRows]]
                 ) -> list[VMRolloutStatus] | None:
        """The rows of the hosts whose rows are not those adopted last (None: all may)."""
        if not self._hosts:
            return None
        return [r for name, host_rows in hosts if self._hosts.get(name) is not host_rows
                for r in host_rows]

    def spec(self) -> VMUpdateSpec | None:
        try:
            spec = VMUpdateSpec.model_validate(dict(self.body.get("spec") or {}))
        except ValidationError as exc:
            message = f"spec does not validate: {exc}"
            if message != self._spec_error:
                self.deps.events("Warning", "InvalidSpec", message[:1000])
            self._spec_error = message
            return None
        self._spec_error = None
        return spec

    def _claim(self) -> Claim | None:
        """This VMUpdate for the one-owner rule (its rows are the planner's to add)."""
        claim = claim_from_body({"metadata": self.body.get("metadata") or {},
                                 "spec": self.body.get("spec") or {}})
        return claim if claim is not None and claim.uid else None

    @property
    def generation(self) -> int:
        return int((self.body.get("metadata") or {}).get("generation") or 0)

    def _apply_changes(self) -> None:
        changes, self._changes = self._changes, []
        self._pending = {}
        if not changes:
            return
        by_key = dict(self._by_key)  # the written one stays as it was (for the Events)
        changed: set[Key] = set()
        for key, change in changes:
            row = by_key.get(key)
            if row is not None:
                by_key[key] = change(row)
                changed.add(key)
        self._by_key = by_key
        self.rows = _replaced(self.rows, by_key, changed)
        for host in {key[0] for key in changed}:
            if host not in self._current:  # not from a plan: the planner groups self.rows
                self._current = {}
                break
            self._current[host] = tuple(by_key[(host, r.name)] for r in self._current[host])

    async def step(self, *, hold: str | None = None) -> bool:
        """One reconcile: plan, write status, start what the plan started. False when the
        status could not be written (nothing was started then)."""
        spec = self.spec()
        if spec is None:
            return True
        self._apply_changes()
        now = self.deps.clock()
        generation = self.generation
        observed = self.status.observed_generation if self.status else None
        plan = self._planner.plan(uid=self.uid, generation=generation, observed_generation=observed,
                             spec=spec, hosts=self.deps.hosts(), rows=self.rows, now=now,
                             stale_after=self.deps.stale_after,
                             hold=hold or (DELETING if self._deleting else None),
                             me=self._claim(), others=self.deps.claims(),
                             by_host=list(self._current.items()) if self._current else None)
        rows = list(plan.rows)
        status = build_status(previous=self.status, spec=spec, generation=generation,
                              plan=plan, now=now)
        if plan.started and not spec.dry_run:
            # Before the first real Update of this rollout.
            status = with_start_time(status, now)
        # The records and the status at once: only the records carry what a restart
        # needs, and nothing starts unless both were written.
        written = await asyncio.gather(self._write_records(rows, plan.hosts),
                                       self._write_status(status))
        if not all(written):
            return False
        before, before_rows = self.status, self._reported
        changed = self._changed(plan.hosts)
        self.status = status
        self._adopt(rows, plan.hosts)
        report(self.deps.events, self.deps.metrics, before_rows=before_rows,
               after_rows=rows if changed is None else changed,
               before=before, after=status, spec=spec, now=now)
        self._follow(plan.started)
        return True

    def _follow(self, started: Sequence[VMRolloutStatus]) -> None:
        """A task for each row in flight without one: every such row the first time, then
        only the rows just started and those whose task ended (a fleet's rows are not
        looked at again); the ended tasks are forgotten."""
        if self._all_rows:
            keys = [key_of(r) for r in self.rows if r.phase in IN_PROGRESS_VM_PHASES]
        else:
            keys = sorted({key_of(r) for r in started} | self._ended)
        self._all_rows = False
        ended, self._ended = self._ended, set()
        for key in ended:
            task = self._tasks.get(key)
            if task is not None and task.done():
                del self._tasks[key]
        live = self._live_tasks()
        for key in keys:
            row = self._by_key.get(key)
            if row is None or row.phase not in IN_PROGRESS_VM_PHASES:
                continue
            # With the changes posted meanwhile: a task that just finished posted its result.
            current = self._still_in_flight(key)
            if current is not None and key not in live:
                self._spawn(current)

    async def _write_status(self, status: VMUpdateStatus) -> bool:
        if self.status is not None and status.to_wire() == self.status.to_wire():
            return True
        try:
            await self.deps.writer.write(self.name, status)
        except StatusWriteError as exc:
            log.warning("VMUpdate %s: %s; retrying", self.name, exc)
            return False
        return True

    async def _write_records(self, rows: Sequence[VMRolloutStatus],
                             hosts: Sequence[tuple[str, planning.HostRows]] = ()) -> bool:
        """Write the records that changed, host by host (several at once); True when every
        write succeeded (each success is remembered, so a retry sends only the rest).
        ``hosts``: ``rows`` host by host, as the plan gave them (a host whose rows are the
        tuple last written is not looked at)."""
        plain = {h: rs for h, rs in hosts}
        after = ({h: {r.name: r for r in rs} for h, rs in hosts
                  if self._written_hosts.get(h) is not rs} if hosts else records.by_host(rows))
        writes: list[tuple[str, RecordWrite, records.HostRows]] = []
        for host, new in after.items():
            old = self._written.get(host)
            if old is not None and len(old) == len(new) and all(
                    old.get(name) is row for name, row in new.items()):
                self._remember(host, new, plain)
                continue  # the same records
            patch = records.record_patch(self.name, self.uid, host, old or {}, new)
            if patch is None:
                continue
            writes.append((host, RecordWrite(
                name=records.record_name(self.name, self.uid, host),
                body=records.new_record(self.name, self.uid, host, new), patch=patch,
                exists=old is not None, create=not self._deleting), new))
        if not writes:
            return True
        gate = asyncio.Semaphore(RECORD_WRITES)

        async def one(host: str, write: RecordWrite, new: records.HostRows) -> bool:
            async with gate:
                try:
                    await self.deps.records.write(write)
                except StatusWriteError as exc:
                    log.warning("VMUpdate %s: %s; retrying", self.name, exc)
                    return False
            self._remember(host, new, plain)
            return True

        results = await asyncio.gather(*(one(*w) for w in writes))
        return all(results)

    def _remember(self, host: str, new: records.HostRows,
                  plain: Mapping[str, planning.HostRows]) -> None:
        """The VMUpdateHost of ``host`` holds ``new`` (``plain``: the plan's tuples)."""
        self._written[host] = new
        if host in plain:
            self._written_hosts[host] = plain[host]
        else:
            self._written_hosts.pop(host, None)

    def _live_tasks(self) -> set[Key]:
        return {k for k, t in self._tasks.items() if not t.done()}

    async def _sleep(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()
        if not self._stop.is_set():
            await asyncio.sleep(COALESCE_S)

    async def _drain(self) -> None:
        """Deleting: start nothing, record the running operations until they end."""
        deadline = asyncio.get_running_loop().time() + self.deps.deletion_wait_s
        while True:
            written = await self.step()
            if self.running == 0 and written and not self._changes:
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.error("VMUpdate %s deleted while %d VM operation(s) still run; not "
                          "waiting longer", self.name, self.running)
                return
            await self._sleep(min(remaining, self.deps.resync_s))

    async def _cancel_tasks(self) -> None:
        if self._progress_wake is not None:
            self._progress_wake.cancel()
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- VM tasks ----------------------------------------------------------------------------

    def post(self, key: Key, change: RowChange, *, soon: bool = True) -> None:
        """A VM task's news: applied to the row at the next step -- at once, or (progress,
        ``soon=False``) within PROGRESS_S, so that a fleet's progress events do not each
        cost a write."""
        self._changes.append((key, change))
        self._pending.setdefault(key, []).append(change)
        if soon:
            self._wake.set()
        elif self._progress_wake is None:
            def wake() -> None:
                self._progress_wake = None
                self._wake.set()
            self._progress_wake = asyncio.get_running_loop().call_later(PROGRESS_S, wake)

    def row(self, key: Key) -> VMRolloutStatus | None:
        row = self._by_key.get(key)
        for change in self._pending.get(key, ()):  # what is not applied yet
            if row is not None:
                row = change(row)
        return row

    def _host(self, name: str) -> HostInventory | None:
        return next((h for h in self.deps.hosts() if h.name == name), None)

    def _spawn(self, row: VMRolloutStatus) -> None:
        key = key_of(row)
        drive = self._drive_update if row.operation_id else self._drive_preflight
        log.info("VMUpdate %s: following %s of %s on %s (%s)", self.name,
                 f"operation {row.operation_id}" if row.operation_id else "the preflight",
                 row.name, row.host, row.message or row.phase.value)
        self._tasks[key] = asyncio.create_task(self._guarded(key, drive),
                                               name=f"vmupdate:{self.name}:{key[0]}/{key[1]}")

    async def _guarded(self, key: Key, drive: Callable[[Key], Any]) -> None:
        self.deps.metrics.in_flight.inc()
        try:
            await drive(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: keep the row in flight, the next step retries
            log.exception("VMUpdate %s: task for %s/%s failed", self.name, *key)
            message = f"operator error, retrying: {exc!r}"[:1000]
            self.post(key, lambda r: r.model_copy(update={"message": message}))
        finally:
            self.deps.metrics.in_flight.dec()
            self._ended.add(key)
            self._wake.set()

    async def _client(self, key: Key, delays: Iterator[float]) -> Any | None:
        """The agent client for the VM's host, or None after waiting (the caller loops)."""
        row = self.row(key)
        host = self._host(row.host) if row is not None else None
        if host is None or not host.endpoint:
            why = "no VMHost" if host is None else "no endpoint in its VMHost"
            self.post(key, lambda r: r.model_copy(update={
                "message": f"waiting for the agent of {key[0]}: {why}"}))
            await asyncio.sleep(next(delays))
            return None
        return await self.deps.agents.client(host.name, host.endpoint)

    def _still_in_flight(self, key: Key) -> VMRolloutStatus | None:
        row = self.row(key)
        return row if row is not None and row.phase in IN_PROGRESS_VM_PHASES else None

    async def _drive_update(self, key: Key) -> None:
        delays = backoff()
        while (row := self._still_in_flight(key)) is not None:
            spec = self.spec()
            client = await self._client(key, delays)
            if client is None or spec is None:
                continue
            try:
                request = await self._request_for(client, row, spec)
                if request is None:
                    self.post(key, functools.partial(_not_started, generation=self.generation))
                    self.wake()
                    return
                result = await client.update(
                    request, on_event=lambda e: self._on_progress(key, e),
                    timeout=self.deps.update_timeout_s)
            except AgentError as exc:
                if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                    continue  # journaled with another request: the next round follows it
                if await self._agent_refused(key, exc, delays, dry_run=False):
                    return
                continue
            now = self.deps.clock()
            self.post(key, functools.partial(translate.with_result, result=result, now=now,
                                        strategy=spec.strategy))
            self._count_result(result)
            return

    async def _request_for(self, client: Any, row: VMRolloutStatus, spec: VMUpdateSpec
                           ) -> pb.UpdateRequest | None:
        """The request to send for the row's operation: the journaled one when the agent
        has it (so a resend is the same request and the agent follows its operation), else a
        new one under the row's id (the first send never arrived) -- or None when the spec
        changed since the row's id was made: nothing starts for an earlier rollout."""
        assert row.operation_id
        try:
            operation = await client.get_operation(row.operation_id)
        except AgentError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
            ref = parse_operation_id(row.operation_id)
            if ref is not None and ref.generation != self.generation:
                return None
            return translate.update_request(row, spec)
        request: pb.UpdateRequest = operation.request
        return request

    def _on_progress(self, key: Key, event: pb.OperationEvent) -> None:
        if event.HasField("progress"):
            progress = event.progress
            self.post(key, functools.partial(translate.with_progress, progress=progress),
                      soon=False)

    def _count_result(self, result: pb.UpdateResult) -> None:
        metrics = self.deps.metrics
        outcome = pb.Outcome.Name(result.outcome).removeprefix("OUTCOME_").lower()
        metrics.vm_updates.labels(outcome).inc()
        if "total" in result.phase_ms:
            metrics.vm_update.labels(outcome).observe(result.phase_ms["total"] / 1000)
        if result.HasField("pause_ms"):
            mode = translate.PB_TO_CPR_MODE.get(result.mode)
            metrics.vm_pause.labels(mode.value if mode else "unknown").observe(
                result.pause_ms / 1000)

    async def _agent_refused(self, key: Key, exc: AgentError, delays: Iterator[float], *,
                             dry_run: bool) -> bool:
        """Record a refusal; True when it ends the VM's operation, False to try again."""
        what = translate.on_error(exc.code)
        now = self.deps.clock()
        message = f"agent {exc.target}: {exc.code.name}: {exc.details}"
        self.post(key, functools.partial(translate.with_error, what=what, message=message,
                                         now=now, dry_run=dry_run))
        if what == translate.OnError.RETRY:
            await asyncio.sleep(next(delays))
            return False
        return True

    async def _drive_preflight(self, key: Key) -> None:
        delays = backoff()
        while (row := self._still_in_flight(key)) is not None:
            spec = self.spec()
            client = await self._client(key, delays)
            if client is None or spec is None:
                continue
            try:
                report = await client.preflight(translate.preflight_request(row, spec))
            except AgentError as exc:
                if await self._agent_refused(key, exc, delays, dry_run=True):
                    return
                continue
            now = self.deps.clock()
            self.post(key, functools.partial(translate.with_preflight, report=report, now=now))
            self.deps.metrics.preflights.labels("passed" if report.passed else "failed").inc()
            return
