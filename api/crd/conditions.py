"""Conditions of the custom resources: their types, the reasons the operator writes, the
Condition model (the shape and limits of metav1.Condition) and :func:`condition`, which sets
one as Kubernetes does (the transition time moves only when the status changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from vmupdate_api.crd.meta import K8sModel, Time, k8s_time
from vmupdate_api.crd.rules import CONDITION_REASON_RE, CONDITION_TYPE_RE

# Condition types. VMUpdate: Ready, Progressing, Degraded (kstatus-compatible). VMHost: Ready.
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_DEGRADED = "Degraded"
VMUPDATE_CONDITION_TYPES: tuple[str, ...] = (COND_READY, COND_PROGRESSING, COND_DEGRADED)
VMHOST_CONDITION_TYPES: tuple[str, ...] = (COND_READY,)
CONDITION_TYPES: tuple[str, ...] = VMUPDATE_CONDITION_TYPES


# The limits of metav1.Condition's fields, shared by Condition and ConditionUpdate.
ConditionType = Annotated[str, StringConstraints(max_length=316, pattern=CONDITION_TYPE_RE)]
ConditionReason = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=CONDITION_REASON_RE)]
ConditionMessage = Annotated[str, StringConstraints(max_length=32768)]
Generation = Annotated[int, Field(ge=0)]


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(K8sModel):
    """A Kubernetes-style condition (same shape and limits as metav1.Condition)."""

    type: ConditionType
    """Condition type in CamelCase: Ready, Progressing or Degraded."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: ConditionReason
    """Machine-readable CamelCase reason for the last transition."""
    message: ConditionMessage = ""
    """Human-readable details."""
    last_transition_time: Time
    """When status last changed (not when reason or message did)."""
    observed_generation: Generation | None = None
    """metadata.generation this condition was computed from."""


def find_condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    """The first condition of type ``type_``, or None."""
    return next((c for c in conditions if c.type == type_), None)


def condition(
    conditions: Sequence[Condition],
    new: Condition | ConditionUpdate,
    now: datetime,
) -> list[Condition]:
    """Set one condition; return the new list (the input is not modified).

    * The condition of ``new.type`` is replaced in place, or appended when absent; every
      other condition is kept as it was, in its position. Later duplicates of ``new.type``
      (which a valid object cannot hold) are dropped.
    * ``lastTransitionTime`` is kept from the existing condition when ``status`` is unchanged,
      and becomes ``now`` (UTC, whole seconds) when ``status`` changes or the condition is new.
      A ``lastTransitionTime`` carried by ``new`` is ignored: the transition decides it.
    * ``reason``, ``message`` and ``observedGeneration`` always come from ``new``.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    stamp = k8s_time(now)
    old = find_condition(conditions, new.type)
    ltt = old.last_transition_time if old is not None and old.status == new.status else stamp
    updated = Condition(
        type=new.type,
        status=new.status,
        reason=new.reason,
        message=new.message,
        last_transition_time=ltt,
        observed_generation=new.observed_generation,
    )
    out: list[Condition] = []
    placed = False
    for c in conditions:
        if c.type != new.type:
            out.append(c)
        elif not placed:
            out.append(updated)
            placed = True
    if not placed:
        out.append(updated)
    return out


class ConditionUpdate(K8sModel):
    """A condition to set with :func:`condition`: everything but the transition time."""

    type: ConditionType
    status: ConditionStatus
    reason: ConditionReason
    message: ConditionMessage = ""
    observed_generation: Generation | None = None


CONDITIONS_LIST: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class Reason(StrEnum):
    """Condition reasons the operator uses (the schema accepts any CamelCase reason)."""

    # Ready
    ALL_VMS_UPDATED = "AllVMsUpdated"
    NO_MATCHING_VMS = "NoMatchingVMs"
    ROLLOUT_IN_PROGRESS = "RolloutInProgress"
    DRY_RUN_PASSED = "DryRunPassed"
    DRY_RUN_FAILED = "DryRunFailed"
    # Progressing
    PLANNING = "Planning"
    UPDATING_VMS = "UpdatingVMs"
    ROLLOUT_PAUSED = "RolloutPaused"
    ROLLOUT_COMPLETE = "RolloutComplete"
    ROLLOUT_HALTED = "RolloutHalted"
    # Degraded
    NO_FAILURES = "NoFailures"
    VM_UPDATE_FAILED = "VMUpdateFailed"
    CANARY_FAILED = "CanaryFailed"
    FAILURE_LIMIT_EXCEEDED = "FailureLimitExceeded"
    PAUSE_BUDGET_EXCEEDED = "PauseBudgetExceeded"
    OVERLAPPING_VMUPDATE = "OverlappingVMUpdate"
    # VMHost Ready
    AGENT_READY = "AgentReady"
    AGENT_NOT_READY = "AgentNotReady"
