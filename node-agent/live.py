"""A live operation: an update running in this process, its journaled events and followers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from vmupdate_agent.convert import phase_durations
from vmupdate_agent.journal import Journal, JournalError, OperationRecord, OperationState
from vmupdate_agent.models import Phase, ProgressEvent, UpdateResult, VMInfo

log = logging.getLogger(__name__)

# Followers of an operation re-check its state at least this often.
FOLLOW_POLL_S = 10.0


class LiveOperation:
    """An operation running in this process: its events, its followers, its journal record.

    An event is shown to followers only once it is in the journal file. Its sequence number
    is its position there, so a client that saw event N finds N again after an agent
    restart and reattaches after it without gaps. These writes skip fsync (a killed process
    does not lose the page cache; the accepted record and the result are fsynced) and run
    in a worker thread, so the engine's progress callback never waits for them.
    """

    def __init__(self, record: OperationRecord, journal: Journal) -> None:
        self.record = record
        self.events: list[ProgressEvent] = list(record.events)  # journaled: followers see these
        self.result: UpdateResult | None = None
        self.task: asyncio.Task[None] | None = None
        self._journal = journal
        self._changed = asyncio.Event()
        self._pending: list[ProgressEvent] = []
        self._writer: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.record.operation_id

    @property
    def vm(self) -> VMInfo:
        return self.record.vm

    def add(self, event: ProgressEvent) -> None:
        """The engine's progress sink: never blocks (it is called inside the guest pause)."""
        self._pending.append(event)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"journal:{self.id}")

    def note(self, phase: Phase, message: str) -> None:
        log.info("operation %s on %s: %s: %s", self.id, self.vm.name, phase.value, message)
        self.add(ProgressEvent(phase=phase, time_ns=time.time_ns(), message=message))

    def adopt(self, record: OperationRecord) -> None:
        """The operation was finished by the process that ran it: take its journaled end."""
        self.record = record
        self.events = list(record.events)
        self.result = record.result
        self._wake()

    def snapshot(self) -> OperationRecord:
        return self.record.model_copy(update={"events": tuple(self.events)})

    async def _write(self) -> None:
        while self._pending:
            batch = list(self._pending)
            record = self.record.model_copy(update={"events": (*self.events, *batch)})
            try:
                await asyncio.to_thread(self._journal.save, record, durable=False)
            except JournalError as exc:
                # Followers still see the events; a restart may then renumber them.
                log.error("operation %s: events not journaled: %s", self.id, exc)
            self.events.extend(batch)
            del self._pending[:len(batch)]
            self._wake()

    async def finish(self, result: UpdateResult, *, resolved_after_restart: bool) -> None:
        """Journal the result durably, then tell the followers."""
        while self._writer is not None and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), 30)
        # One definition of phase durations for every operation: from the event times.
        result = result.model_copy(update={"phase_ms": phase_durations(self.events)})
        record = self.snapshot().model_copy(update={
            "state": OperationState.DONE, "result": result, "finished_ns": time.time_ns(),
            "resolved_after_restart": resolved_after_restart})
        try:
            await asyncio.to_thread(self._journal.save, record)
        except JournalError as exc:
            # The followers still learn the result; after a restart the operation is
            # resolved again from the VM itself.
            log.error("operation %s: result not journaled: %s", self.id, exc)
        self.record = record
        self.result = result
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[tuple[int, ProgressEvent | UpdateResult]]:
        """(sequence, item) after `after`: the events so far, then live ones, then the result."""
        sent = after
        while True:
            changed = self._changed
            while sent < len(self.events):
                sent += 1
                yield sent, self.events[sent - 1]
            if self.result is not None:
                if sent == len(self.events):
                    yield sent + 1, self.result
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), FOLLOW_POLL_S)
