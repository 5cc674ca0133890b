"""A VMUpdate's per-VM records: one VMUpdateHost object per (VMUpdate, host). Pure.

The VMUpdate's own status stays bounded (counts, the first in-flight and failed VMs, the
history); every selected VM's record lives in the VMUpdateHost of its host, which the
VMUpdate owns (ownerReferences: the garbage collector deletes them with it; the operator
deletes them too, for clusters without one). Records are a map by VM name, so a change is a
JSON merge patch of the VMs that changed, not a rewrite of the host's or the fleet's rows.

Names: ``<vmupdate>.<first 8 of its uid>.<host>`` (a DNS subdomain, since both names are);
a recreated VMUpdate of the same name gets other objects. Past 253 characters the host part
becomes a hash. Labels: ``vmupdate.dev/vmupdate`` (the VMUpdate's name) and
``vmupdate.dev/host`` when the name fits a label value (63 characters),
``vmupdate.dev/vmupdate-uid`` always, ``vmupdate.dev/failed=true`` while a VM of it failed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vmupdate_api.crd.constants import (
    API_VERSION,
    KIND_VMUPDATE,
    KIND_VMUPDATEHOST,
    LABEL_FAILED,
    LABEL_HOST,
    LABEL_VMUPDATE,
    LABEL_VMUPDATE_UID,
    MAX_NAME,
)
from vmupdate_api.crd.vmupdate import FAILED_VM_PHASES, IN_PROGRESS_VM_PHASES, VMRolloutStatus
from vmupdate_api.crd.vmupdatehost import VMUpdateHostStatus
from vmupdate_operator.ownership import ACTED_PHASES, Key

HostRows = dict[str, VMRolloutStatus]  # VM name -> record
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def record_name(vmupdate: str, uid: str, host: str) -> str:
    """The VMUpdateHost's name for ``vmupdate`` (of ``uid``) on ``host``."""
    name = f"{vmupdate}.{uid[:8]}.{host}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(host.encode()).hexdigest()[:16]
    head = vmupdate[: MAX_NAME - 27].rstrip(".-")
    return f"{head}.{uid[:8]}.{digest}"


def _label(value: str) -> str | None:
    return value if len(value) <= 63 and _LABEL_VALUE.match(value) else None


def labels(vmupdate: str, uid: str, host: str, *, failed: bool) -> dict[str, str | None]:
    """The record's labels (None: absent; a merge patch removes it)."""
    return {LABEL_VMUPDATE: _label(vmupdate), LABEL_VMUPDATE_UID: uid,
            LABEL_HOST: _label(host), LABEL_FAILED: "true" if failed else None}


def by_host(rows: Iterable[VMRolloutStatus]) -> dict[str, HostRows]:
    out: dict[str, HostRows] = {}
    for row in rows:
        out.setdefault(row.host, {})[row.name] = row
    return out


def _summary(rows: Mapping[str, VMRolloutStatus]) -> VMUpdateHostStatus:
    return VMUpdateHostStatus(vms=dict(rows)).summarize()


def _row_wire(row: VMRolloutStatus) -> dict[str, Any]:
    """The row as a merge patch value: unset fields null, so they are removed."""
    wire = row.to_wire()
    for name, info in VMRolloutStatus.model_fields.items():
        wire.setdefault(info.alias or name, None)
    return wire


def new_record(vmupdate: str, uid: str, host: str, rows: Mapping[str, VMRolloutStatus]
               ) -> dict[str, Any]:
    """The whole VMUpdateHost object, to create."""
    summary = _summary(rows)
    return {
        "apiVersion": API_VERSION, "kind": KIND_VMUPDATEHOST,
        "metadata": {
            "name": record_name(vmupdate, uid, host),
            "labels": {k: v for k, v in labels(vmupdate, uid, host,
                                               failed=summary.failed > 0).items()
                       if v is not None},
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND_VMUPDATE,
                                 "name": vmupdate, "uid": uid, "controller": True}],
        },
        "spec": {"vmUpdate": vmupdate, "vmUpdateUid": uid, "host": host},
        "status": summary.to_wire(),
    }


def record_patch(vmupdate: str, uid: str, host: str, before: Mapping[str, VMRolloutStatus],
                 after: Mapping[str, VMRolloutStatus]) -> dict[str, Any] | None:
    """A JSON merge patch from the record ``before`` to ``after`` (None: nothing changed):
    the changed VMs (removed ones as null), the counts and the failed label."""
    changed: dict[str, Any] = {}
    for name, row in after.items():
        old = before.get(name)
        if old is not row and old != row:
            changed[name] = _row_wire(row)
    for name in before.keys() - after.keys():
        changed[name] = None
    if not changed:
        return None
    summary = _summary(after).to_wire()
    summary.pop("vms", None)
    summary.setdefault("failures", None)
    old_failed = any(r.phase in FAILED_VM_PHASES for r in before.values())
    patch: dict[str, Any] = {"status": {**summary, "vms": changed}}
    if old_failed != (summary["failed"] > 0):
        patch["metadata"] = {"labels": {LABEL_FAILED: "true" if summary["failed"] else None}}
    return patch


@dataclass(frozen=True)
class HostRecord:
    """One VMUpdateHost as the operator's index keeps it: the records are parsed only when
    read (a rollout starting, a deletion), the keys the one-owner rule needs at once."""

    uid: str
    host: str
    raw: Mapping[str, Any] = field(default_factory=dict)
    in_flight: frozenset[Key] = frozenset()
    acted: frozenset[Key] = frozenset()

    def rows(self) -> list[VMRolloutStatus]:
        out = []
        for name, value in self.raw.items():
            try:
                row = VMRolloutStatus.model_validate(dict(value))
            except (ValidationError, TypeError, ValueError):
                continue  # not expected (the API server validated it); rebuilt by planning
            if row.name == name and row.host == self.host:
                out.append(row)
        return out


def record_from_body(body: Mapping[str, Any]) -> HostRecord | None:
    """A VMUpdateHost as the API returns it; None when it names no VMUpdate."""
    spec = body.get("spec") or {}
    uid, host = spec.get("vmUpdateUid"), spec.get("host")
    if not isinstance(uid, str) or not isinstance(host, str) or not uid or not host:
        return None
    raw = (body.get("status") or {}).get("vms") or {}
    if not isinstance(raw, Mapping):
        raw = {}
    in_flight, acted = set(), set()
    for name, value in raw.items():
        if not isinstance(value, Mapping) or not value.get("operationId"):
            continue
        phase = value.get("phase")
        if phase in IN_PROGRESS_VM_PHASES:
            in_flight.add((host, str(name)))
        elif phase in ACTED_PHASES:
            acted.add((host, str(name)))
    return HostRecord(uid=uid, host=host, raw={str(k): dict(v) for k, v in raw.items()
                                               if isinstance(v, Mapping)},
                      in_flight=frozenset(in_flight), acted=frozenset(acted))
