"""Operation ids: the name of one intended update of one VM, the same every time it is computed.

The agents journal each update under its operation id and never run an id twice, so the id
is what makes a restarted operator safe: it recomputes (or reads back from status) the same
id for the same intent and follows the journaled operation instead of starting a second one.

An id is derived from the VMUpdate's uid and generation, the VM's identity and an attempt
number::

    vmu-<uid>-g<generation>-<vm>-a<attempt>

* uid: a deleted and re-created VMUpdate of the same name is a new intent.
* generation: a spec change is a new intent (a failed VM is tried again under a new id).
* vm: QEMU's VM UUID, or, for a VM started without ``-uuid``, a hash of host and name.
* attempt: 0, except when a VM that this generation already updated is found on another
  binary again (a person or a tool put it back): the next attempt is a new intent. The
  attempt of the last operation is kept in the row's operationId, so it survives restarts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

PREFIX = "vmu"
NIL_UUID = "00000000-0000-0000-0000-000000000000"
# What the agent accepts as an operation id; a Kubernetes uid and a VM UUID fit in it.
AGENT_OPERATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SAFE_PART = re.compile(r"[A-Za-z0-9-]{1,36}")
_PARSE = re.compile(
    r"vmu-(?P<uid>[A-Za-z0-9-]{1,36})-g(?P<generation>[0-9]{1,12})-(?P<vm>[A-Za-z0-9-]{1,36})"
    r"-a(?P<attempt>[0-9]{1,6})"
)


@dataclass(frozen=True)
class OperationRef:
    """What an operation id says about the intent it names."""

    uid: str
    generation: int
    vm: str
    attempt: int


def _part(value: str) -> str:
    """``value`` if it is id-safe and short, else a stable hash of it."""
    if _SAFE_PART.fullmatch(value):
        return value
    return "h" + hashlib.sha256(value.encode()).hexdigest()[:31]


def vm_identity(host: str, name: str, uuid: str | None) -> str:
    """The VM's part of an operation id: its UUID, or a hash of where it runs and its name."""
    if uuid and uuid.lower() != NIL_UUID:
        return _part(uuid.lower())
    return "h" + hashlib.sha256(f"{host}/{name}".encode()).hexdigest()[:31]


def operation_id(uid: str, generation: int, vm: str, attempt: int = 0) -> str:
    """The id of attempt ``attempt`` at updating ``vm`` (see :func:`vm_identity`)."""
    if generation < 0 or attempt < 0:
        raise ValueError("generation and attempt must not be negative")
    op_id = f"{PREFIX}-{_part(uid)}-g{generation}-{_part(vm)}-a{attempt}"
    assert AGENT_OPERATION_ID.fullmatch(op_id), op_id
    return op_id


def parse_operation_id(op_id: str | None) -> OperationRef | None:
    """The parts of an id this module made, or None (absent, or made by someone else)."""
    if not op_id:
        return None
    match = _PARSE.fullmatch(op_id)
    if match is None:
        return None
    return OperationRef(uid=match["uid"], generation=int(match["generation"]), vm=match["vm"],
                        attempt=int(match["attempt"]))


def next_operation_id(uid: str, generation: int, vm: str, previous: str | None) -> str:
    """The id for a new attempt at ``vm``, after the row's last operation ``previous``.

    A previous operation of the same VMUpdate, generation and VM makes this the next attempt;
    anything else starts at attempt 0.
    """
    ref = parse_operation_id(previous)
    same_intent = (ref is not None and ref.uid == _part(uid) and ref.generation == generation
                   and ref.vm == _part(vm))
    attempt = ref.attempt + 1 if same_intent and ref is not None else 0
    return operation_id(uid, generation, vm, attempt)
