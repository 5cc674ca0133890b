"""Pydantic models of the vmupdate custom resources: the single source of truth.

The CRDs under ``crds/`` and ``charts/vmupdate/crds/`` are generated from these models by
``python -m vmupdate_api.crdgen`` (a drift test keeps them equal). The models use snake_case
attributes in Python and camelCase names on the wire (``model_dump(by_alias=True)``, or
:meth:`K8sModel.to_wire`); both spellings are accepted when validating.

Admission rules live next to the fields they constrain, as :class:`Rule` objects: each one
carries the CEL expression the API server runs (``x-kubernetes-validations``), the message a
person sees, and, where it can be judged from one object alone, the same check in Python, so
the operator and the tests reject exactly what the API server rejects, with the same words.

Resources (group ``vmupdate.dev``, version ``v1alpha1``, both cluster-scoped):

* **VMUpdate** -- the QEMU a set of VMs must run. Desired state, converged continuously: VMs
  that appear later are updated too. Editing the spec starts a new rollout for the new
  generation (as with a Deployment); earlier rollouts are kept in ``status.history``.
* **VMHost** -- one per node, named after the node and written by that node's agent: the
  agent's endpoint, the QEMU binaries on the host and one row per VM.
* **VMUpdateHost** -- a VMUpdate's record of each selected VM on one host (owned by the
  VMUpdate, written by the operator), so that the VMUpdate's own status stays bounded
  whatever the fleet: counts, the first in-flight and failed VMs, the history.

Phases and conditions of a VMUpdate (written by the operator only):

=============== ======================================================= ===== =========== ========
phase           meaning                                                 Ready Progressing Degraded
=============== ======================================================= ===== =========== ========
Pending         accepted, not yet looked at by the operator             -     -           -
Planning        resolving the selector against the VMHost inventories   False True        False
Progressing     VM updates running or queued                            False True        any
Paused          ``spec.paused``: no new VM is started                   False False       any
Succeeded       every selected VM runs ``spec.target`` (or none match)  True  False       False
Degraded        nothing left to do, but some VMs failed (within policy) False False       True
                or belong to another VMUpdate (Blocked)
Failed          halted: failures over policy, canary failed, or a VM    False False       True
                paused longer than ``pauseBudgetMs``
DryRunComplete  ``spec.dryRun``: preflight done on every selected VM    *     False       **
=============== ======================================================= ===== =========== ========

``*`` True when every preflight passed; ``**`` True when any preflight failed. "any" means
True once some VM failed while the rollout goes on. Precedence when several apply:
Failed > Paused > Planning/Progressing > Degraded > Succeeded. ``Succeeded`` is not final: a
VM that appears later moves the phase back to ``Progressing``. ``Failed`` is left by a spec
change (a new generation gets new operation ids, so failed VMs are tried again).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from vmupdate_api import extra_args as allowlist

# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

GROUP: Final = "vmupdate.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "vmupdate.dev/v1alpha1"

KIND_VMUPDATE: Final = "VMUpdate"
PLURAL_VMUPDATES: Final = "vmupdates"
SINGULAR_VMUPDATE: Final = "vmupdate"
SHORT_NAMES_VMUPDATE: Final = ("vmu",)

KIND_VMHOST: Final = "VMHost"
PLURAL_VMHOSTS: Final = "vmhosts"
SINGULAR_VMHOST: Final = "vmhost"
SHORT_NAMES_VMHOST: Final = ("vmh",)

KIND_VMUPDATEHOST: Final = "VMUpdateHost"
PLURAL_VMUPDATEHOSTS: Final = "vmupdatehosts"
SINGULAR_VMUPDATEHOST: Final = "vmupdatehost"
SHORT_NAMES_VMUPDATEHOST: Final = ("vmuh",)

# Labels of a VMUpdateHost: its VMUpdate (by name when the name fits a label value, always by
# uid), its host (when it fits), and "true" while some VM of it failed.
LABEL_VMUPDATE: Final = f"{GROUP}/vmupdate"
LABEL_VMUPDATE_UID: Final = f"{GROUP}/vmupdate-uid"
LABEL_HOST: Final = f"{GROUP}/host"
LABEL_FAILED: Final = f"{GROUP}/failed"

# Condition types. VMUpdate: Ready, Progressing, Degraded (kstatus-compatible). VMHost: Ready.
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_DEGRADED = "Degraded"
VMUPDATE_CONDITION_TYPES: tuple[str, ...] = (COND_READY, COND_PROGRESSING, COND_DEGRADED)
VMHOST_CONDITION_TYPES: tuple[str, ...] = (COND_READY,)
CONDITION_TYPES: tuple[str, ...] = VMUPDATE_CONDITION_TYPES

# Size limits. The API server needs a bound on every string and list a CEL rule may touch
# (for its cost estimate); every other one is bounded too, to keep objects within etcd's size.
MAX_VM_ROWS = 100_000  # VMs one VMUpdate tracks (in its VMUpdateHost records and in memory)
MAX_LISTED_VMS = 20  # VMUpdate.status.inProgressVMs / failedVMs: the rest are only counted
MAX_HISTORY = 10  # VMUpdate.status.history: earlier rollouts kept
MAX_HOST_VMS = 512  # VMHost.status.vms, VMUpdateHost.status.vms
MAX_MESSAGE = 1024
MAX_PATH = 1024
MAX_NAME = 253

# --------------------------------------------------------------------------------------------
# Admission rules: one definition for the API server (CEL) and for Python
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry and, where possible, its Python twin.

    ``cel`` is evaluated by the API server with ``self`` bound to the value at the place the
    rule is attached (``oldSelf`` to the stored value for transition rules). ``check`` gets the
    same value in Python (a model instance for model rules) and returns True when it is valid;
    it is None for rules Python cannot judge from one object (transition rules).
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None

    def to_k8s(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def validate(self, value: Any) -> None:
        if self.check is not None and not self.check(value):
            raise ValueError(self.message)


@dataclass(frozen=True)
class Validations:
    """``Annotated`` marker attaching :class:`Rule` objects to a field or list item type."""

    rules: tuple[Rule, ...]

    def __get_pydantic_core_schema__(
        self, source_type: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        def run(value: Any) -> Any:
            for rule in self.rules:
                rule.validate(value)
            return value

        return core_schema.no_info_after_validator_function(run, handler(source_type))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.setdefault("x-kubernetes-validations", []).extend(
            r.to_k8s() for r in self.rules
        )
        return json_schema


def cel_string(text: str) -> str:
    """Quote ``text`` as a CEL string literal (single quotes, backslash escapes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def regex_rule(core: str, message: str) -> Rule:
    """A rule that the whole string matches ``core`` (RE2 / Python ``re`` common subset)."""
    compiled = re.compile(core)
    return Rule(
        cel=f"self.matches({cel_string('^' + core + '$')})",
        message=message,
        check=lambda v: compiled.fullmatch(v) is not None,
    )


def _unique(values: list[str] | None) -> list[str] | None:
    """Python twin of ``x-kubernetes-list-type: set`` (the server says "Duplicate value")."""
    if values is not None:
        seen: set[str] = set()
        for v in values:
            if v in seen:
                raise ValueError(f'Duplicate value: "{v}"')
            seen.add(v)
    return values


LIST_SET: dict[str, Any] = {"x-kubernetes-list-type": "set"}

# Regular expressions (the part between ^ and $), shared by CEL and Python.
NODE_NAME_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
VM_NAME_PATTERN_RE = r"([A-Za-z0-9._:@+=~*?-]|\[!?[A-Za-z0-9._:@+=~-]+\])+"
QEMU_VERSION_RE = r"[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}"
QEMU_VERSION_PREFIX_RE = r"[0-9]{1,4}(\.[0-9]{1,4}){0,2}"
SHA256_RE = r"[0-9a-f]{64}"
ENDPOINT_RE = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
CONDITION_TYPE_RE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_RE = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

BINARY_RULES = (
    Rule(
        cel="self.startsWith('/')",
        message="target.binary must be an absolute path (start with '/'), "
        "e.g. /usr/bin/qemu-system-x86_64",
        check=lambda v: v.startswith("/"),
    ),
    Rule(
        cel="!self.contains('/../') && !self.endsWith('/..')",
        message="target.binary must not contain a '..' path segment: give the resolved path",
        check=lambda v: "/../" not in v and not v.endswith("/.."),
    ),
    Rule(
        cel="!self.endsWith('/')",
        message="target.binary must name the QEMU executable, not a directory "
        "(remove the trailing '/')",
        check=lambda v: not v.endswith("/"),
    ),
)
TARGET_VERSION_RULE = regex_rule(
    QEMU_VERSION_RE,
    "target.version must be a QEMU version MAJOR.MINOR.MICRO such as 11.1.3 "
    "(as `qemu-system-x86_64 -version` prints it)",
)
SHA256_RULE = regex_rule(
    SHA256_RE,
    "target.sha256 must be 64 lowercase hex characters (the first field sha256sum prints)",
)
EXTRA_ARGS_RULE = Rule(
    cel=allowlist.cel_rule(),
    message=allowlist.CEL_MESSAGE,
    check=allowlist.is_allowed,
)
HOST_NAME_RULE = regex_rule(
    NODE_NAME_RE,
    "selector.hostNames entries must be node names: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
)
VM_NAME_RULE = regex_rule(
    VM_NAME_PATTERN_RE,
    "selector.vmNames entries must be VM names or glob patterns: letters, digits, "
    "'._:@+=~-', wildcards '*' '?', and closed [...] classes; no spaces or '/'",
)
NODE_NAME_RULE = regex_rule(
    NODE_NAME_RE,
    "spec.nodeName must be a node name: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit",
)
QEMU_VERSION_SELECTOR_RULE = regex_rule(
    QEMU_VERSION_PREFIX_RE,
    "selector.qemuVersions entries must be QEMU versions such as 10.0.2, "
    "or a prefix such as 10.0 (matches every 10.0.x)",
)

# --------------------------------------------------------------------------------------------
# Common types
# --------------------------------------------------------------------------------------------


def _k8s_time(value: datetime) -> datetime:
    """Kubernetes timestamps are UTC with whole seconds (metav1.Time)."""
    return value.astimezone(UTC).replace(microsecond=0)


def format_time(value: datetime) -> str:
    """RFC 3339 as Kubernetes writes it: ``2025-01-02T03:04:05Z``."""
    return _k8s_time(value).strftime("%Y-%m-%dT%H:%M:%SZ")


Time = Annotated[
    AwareDatetime,
    AfterValidator(_k8s_time),
    PlainSerializer(format_time, return_type=str, when_used="json"),
]
"""A timestamp: timezone-aware, normalised to UTC and whole seconds, RFC 3339 on the wire."""

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
Message = Annotated[str, StringConstraints(max_length=MAX_MESSAGE)]
Path = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH)]
VersionString = Annotated[str, StringConstraints(max_length=64)]

_WIRE_NAMES = {"memory_mib": "memoryMiB", "failed_vms": "failedVMs",
               "in_progress_vms": "inProgressVMs"}


def wire_name(attribute: str) -> str:
    """The camelCase name a snake_case attribute has on the wire."""
    return _WIRE_NAMES.get(attribute) or to_camel(attribute)


class K8sModel(BaseModel):
    """Base of every model: camelCase on the wire, rules from ``__k8s_rules__`` enforced."""

    model_config = ConfigDict(
        alias_generator=wire_name,
        populate_by_name=True,
        use_attribute_docstrings=True,
        use_enum_values=False,
        json_schema_extra=lambda schema, cls: _add_model_rules(schema, cls),
    )

    __k8s_rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _run_k8s_rules(self) -> K8sModel:
        for rule in type(self).__k8s_rules__:
            rule.validate(self)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it (camelCase, no nulls)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _add_model_rules(schema: dict[str, Any], cls: Any) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "__k8s_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_k8s() for r in rules]


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata the operator and agent read (others are kept)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str | None = None
    generate_name: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: Time | None = None
    deletion_timestamp: Time | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(K8sModel):
    """A Kubernetes-style condition (same shape and limits as metav1.Condition)."""

    type: Annotated[str, StringConstraints(max_length=316, pattern=CONDITION_TYPE_RE)]
    """Condition type in CamelCase: Ready, Progressing or Degraded."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=CONDITION_REASON_RE)
    ]
    """Machine-readable CamelCase reason for the last transition."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: Time
    """When status last changed (not when reason or message did)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
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
    stamp = _k8s_time(now)
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

    type: Annotated[str, StringConstraints(max_length=316, pattern=CONDITION_TYPE_RE)]
    status: ConditionStatus
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=CONDITION_REASON_RE)
    ]
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    observed_generation: Annotated[int, Field(ge=0)] | None = None


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


# --------------------------------------------------------------------------------------------
# VMUpdate
# --------------------------------------------------------------------------------------------


class UpdateMode(StrEnum):
    """How the new QEMU takes over. Auto: the best the VM supports, in the order
    strategy.prefer gives (CprExec then CprTransfer by default; CprReboot is never chosen
    automatically: it needs file-backed guest RAM and pauses longer)."""

    AUTO = "Auto"
    CPR_EXEC = "CprExec"
    CPR_TRANSFER = "CprTransfer"
    CPR_REBOOT = "CprReboot"


class CprMode(StrEnum):
    """A concrete CPR migration mode (QEMU's cpr-exec, cpr-transfer, cpr-reboot)."""

    CPR_EXEC = "CprExec"
    CPR_TRANSFER = "CprTransfer"
    CPR_REBOOT = "CprReboot"


class Preference(StrEnum):
    """What mode Auto values when a VM could be updated either way. SamePid: CprExec first
    (the VM keeps its pid; the new QEMU's start-up falls inside the pause). ShortestPause:
    CprTransfer first (the new QEMU starts before the guest stops, so the pause is several
    times shorter; the VM gets a new pid). docs/benchmarks.md has the measured pauses."""

    SAME_PID = "SamePid"
    SHORTEST_PAUSE = "ShortestPause"


class FailurePolicy(StrEnum):
    """Halt: start no new VM once more than maxFailures VMs failed. Continue: record failures
    and go on with the other VMs."""

    HALT = "Halt"
    CONTINUE = "Continue"


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_RE)]


class LabelSelectorRequirement(K8sModel):
    """A node label requirement, as in metav1.LabelSelectorRequirement."""

    __k8s_rules__ = (
        Rule(
            cel="self.operator in ['In', 'NotIn'] ? "
            "(has(self.values) && size(self.values) > 0) : "
            "(!has(self.values) || size(self.values) == 0)",
            message="hostSelector.matchExpressions: operators In and NotIn need a non-empty "
            "values list; Exists and DoesNotExist take no values",
            check=lambda r: (
                bool(r.values)
                if r.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)
                else not r.values
            ),
        ),
    )

    key: Annotated[str, StringConstraints(min_length=1, max_length=317)]
    """Label key, e.g. topology.kubernetes.io/zone."""
    operator: SelectorOperator
    """In, NotIn, Exists or DoesNotExist."""
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = None
    """Values for In and NotIn; must be empty for Exists and DoesNotExist."""


class LabelSelector(K8sModel):
    """Node label selector (metav1.LabelSelector). An empty selector matches every node."""

    match_labels: Annotated[dict[str, LabelValue], Field(max_length=64)] | None = None
    """Labels a node must carry, all of them."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=32)] | None = None
    """Requirements a node must meet, all of them."""


class VMSelector(K8sModel):
    """Which VMs the update is for. Every field given must match (AND); within a list any
    entry may match (OR). At least one field is required; ``hostSelector: {}`` explicitly
    selects every host."""

    __k8s_rules__ = (
        Rule(
            cel="has(self.hostNames) || has(self.hostSelector) || has(self.vmNames) || "
            "has(self.qemuVersions)",
            message="selector must set at least one of hostNames, hostSelector, vmNames, "
            "qemuVersions (use hostSelector: {} to select every host)",
            check=lambda s: any(
                v is not None for v in (s.host_names, s.host_selector, s.vm_names, s.qemu_versions)
            ),
        ),
    )

    host_names: (
        Annotated[
            list[
                Annotated[
                    str, StringConstraints(max_length=MAX_NAME), Validations((HOST_NAME_RULE,))
                ]
            ],
            Field(min_length=1, max_length=256, json_schema_extra=LIST_SET),
            AfterValidator(_unique),
        ]
        | None
    ) = None
    """Node names the VMs must run on."""
    host_selector: LabelSelector | None = None
    """Labels of the nodes the VMs must run on."""
    vm_names: (
        Annotated[
            list[
                Annotated[str, StringConstraints(max_length=MAX_NAME), Validations((VM_NAME_RULE,))]
            ],
            Field(min_length=1, max_length=256, json_schema_extra=LIST_SET),
            AfterValidator(_unique),
        ]
        | None
    ) = None
    """VM names or shell-style glob patterns (*, ?, [a-z], [!x]) matched against the name the
    node agent reports (QEMU's -name, else the QMP socket's file name)."""
    qemu_versions: (
        Annotated[
            list[
                Annotated[
                    str,
                    StringConstraints(max_length=16),
                    Validations((QEMU_VERSION_SELECTOR_RULE,)),
                ]
            ],
            Field(min_length=1, max_length=32, json_schema_extra=LIST_SET),
            AfterValidator(_unique),
        ]
        | None
    ) = None
    """QEMU versions the VMs run now: exact (10.0.2) or a dotted prefix (10.0 matches 10.0.x,
    10 matches 10.x.y)."""


class UpdateTarget(K8sModel):
    """The QEMU the selected VMs must run."""

    binary: Annotated[
        str, StringConstraints(min_length=1, max_length=MAX_PATH), Validations(BINARY_RULES)
    ]
    """Absolute path of the new QEMU binary on every selected host."""
    version: Annotated[str, StringConstraints(max_length=16), Validations((TARGET_VERSION_RULE,))]
    """Version the binary must report (MAJOR.MINOR.MICRO); preflight checks it."""
    sha256: Annotated[str, StringConstraints(max_length=64), Validations((SHA256_RULE,))] | None = (
        None
    )
    """Expected SHA-256 of the binary (lowercase hex); preflight checks it when given."""
    extra_args: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE)]],
            Field(max_length=allowlist.MAX_EXTRA_ARGS),
            Validations((EXTRA_ARGS_RULE,)),
        ]
        | None
    ) = None
    """Arguments appended to the new QEMU's command line (after the VM's own arguments): only
    the options of the allowlist in vmupdate_api.extra_args, each followed by its value
    (today -msg timestamp=on|off,guest-name=on|off)."""


class RolloutStrategy(K8sModel):
    """How fast to go and when to stop."""

    __k8s_rules__ = (
        Rule(
            cel="self.maxParallelPerHost <= self.maxParallel",
            message="strategy.maxParallelPerHost must not exceed strategy.maxParallel: "
            "lower maxParallelPerHost or raise maxParallel",
            check=lambda s: s.max_parallel_per_host <= s.max_parallel,
        ),
        Rule(
            cel="self.failurePolicy == 'Halt' || self.maxFailures == 0",
            message="strategy.maxFailures applies only to failurePolicy Halt: remove "
            "maxFailures or set failurePolicy: Halt",
            check=lambda s: s.failure_policy == FailurePolicy.HALT or s.max_failures == 0,
        ),
    )

    max_parallel: Annotated[int, Field(ge=1, le=1000)] = 1
    """VMs updated at the same time across the cluster."""
    max_parallel_per_host: Annotated[int, Field(ge=1, le=64)] = 1
    """VMs updated at the same time on one host (at most maxParallel)."""
    canary: Annotated[int, Field(ge=0, le=100)] = 0
    """VMs updated one at a time before any parallelism; a failed canary always halts."""
    pause_budget_ms: Annotated[int, Field(ge=1, le=600000)] = 1000
    """Longest acceptable guest pause; a VM paused longer halts the rollout (phase Failed,
    reason PauseBudgetExceeded), though that VM itself stays updated."""
    failure_policy: FailurePolicy = FailurePolicy.HALT
    """Halt (default) or Continue."""
    max_failures: Annotated[int, Field(ge=0, le=1000)] = 0
    """Failed VMs tolerated before a Halt rollout stops (0: stop at the first)."""
    prefer: Preference | None = None
    """With mode Auto only: SamePid (cpr-exec first; the default when unset) or
    ShortestPause (cpr-transfer first)."""

    @staticmethod
    def format_ms(ms: float) -> str:
        """A pause as messages show it: ``1000.4``, ``2500`` (to the microsecond)."""
        return f"{ms:.3f}".rstrip("0").rstrip(".")

    def over_pause_budget(self, pause_ms: float | None) -> bool:
        """Whether a guest pause of ``pause_ms`` (float ms, as in a row) exceeds the budget.

        The one judgement of the budget: the row's message and the rollout's halt both ask
        it, about the same stored value (a 1000.4 ms pause is over a 1000 ms budget).
        """
        return pause_ms is not None and pause_ms > self.pause_budget_ms


class VMUpdateSpec(K8sModel):
    """Desired state: every selected VM runs ``target``."""

    __k8s_rules__ = (
        Rule(
            cel="!has(self.strategy.prefer) || self.mode == 'Auto'",
            message="strategy.prefer applies only to mode Auto: remove strategy.prefer or set "
            "mode: Auto",
            check=lambda s: s.strategy.prefer is None or s.mode == UpdateMode.AUTO,
        ),
    )

    selector: VMSelector
    """Which VMs to update."""
    target: UpdateTarget
    """The QEMU to run. Changing it (any spec change) starts a new rollout: running
    operations finish, every VM not on the new target is updated again; changing it back is
    the rollback."""
    mode: UpdateMode = UpdateMode.AUTO
    """Auto, CprExec, CprTransfer or CprReboot (Auto follows strategy.prefer)."""
    strategy: RolloutStrategy = Field(
        default_factory=RolloutStrategy,
        # The whole default object, not {}: the API server checks the CEL rules against the
        # default as written, before nested defaults would fill it in.
        json_schema_extra={"default": RolloutStrategy().to_wire()},
    )
    """Parallelism, canary, pause budget and failure policy."""
    dry_run: bool = False
    """Run preflight on every selected VM and change nothing."""
    paused: bool = False
    """Start no new VM update (those running finish)."""


class UpdatePhase(StrEnum):
    """Rollout phase; see the module documentation for the table with the conditions."""

    PENDING = "Pending"
    PLANNING = "Planning"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    SUCCEEDED = "Succeeded"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    DRY_RUN_COMPLETE = "DryRunComplete"


class VMPhase(StrEnum):
    """Where one VM is.

    Pending: waiting for its turn. Preflight: the agent is checking it. Updating: CPR under
    way. Updated: runs the target (also when it already did: then no pidBefore). Failed:
    preflight or update failed (the VM keeps running its old QEMU, or its state is unknown;
    see message). RolledBack: the update failed and the agent resumed the VM on its old QEMU.
    Skipped: left the selection or disappeared (host gone, VM shut down) before it was
    updated; not a failure. Blocked: another VMUpdate owns the VM (the message names it; see
    the operator's one-owner rule); not a failure. DryRunPassed / DryRunFailed: preflight
    result of a dry run.
    """

    PENDING = "Pending"
    PREFLIGHT = "Preflight"
    UPDATING = "Updating"
    UPDATED = "Updated"
    FAILED = "Failed"
    ROLLED_BACK = "RolledBack"
    SKIPPED = "Skipped"
    BLOCKED = "Blocked"
    DRY_RUN_PASSED = "DryRunPassed"
    DRY_RUN_FAILED = "DryRunFailed"


FAILED_VM_PHASES = frozenset({VMPhase.FAILED, VMPhase.ROLLED_BACK, VMPhase.DRY_RUN_FAILED})
IN_PROGRESS_VM_PHASES = frozenset({VMPhase.PREFLIGHT, VMPhase.UPDATING})


class VMRolloutStatus(K8sModel):
    """One selected VM in a rollout."""

    host: Name
    """Node the VM runs on."""
    name: Name
    """VM name as the node agent reports it (unique on its host)."""
    uuid: Annotated[str, StringConstraints(max_length=36)] | None = None
    """QEMU's VM UUID."""
    from_version: VersionString | None = None
    """QEMU version before the update."""
    to_version: VersionString | None = None
    """QEMU version after the update."""
    pid_before: Annotated[int, Field(ge=1)] | None = None
    """QEMU pid before the update."""
    pid_after: Annotated[int, Field(ge=1)] | None = None
    """QEMU pid after the update (the same for CprExec)."""
    mode: CprMode | None = None
    """CPR mode used."""
    pause_ms: Annotated[float, Field(ge=0)] | None = None
    """Guest pause in milliseconds (to the microsecond): QEMU's RESUME event time minus its
    STOP event time."""
    phase: VMPhase = VMPhase.PENDING
    """Pending, Preflight, Updating, Updated, Failed, RolledBack, Skipped, Blocked,
    DryRunPassed or DryRunFailed."""
    message: Message | None = None
    """Human-readable detail, e.g. the failed preflight check and its reason."""
    operation_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    """Agent operation id (from the VMUpdate uid, generation and VM uuid)."""
    started_at: Time | None = None
    """When the agent started on this VM."""
    finished_at: Time | None = None
    """When the agent finished with this VM."""


class RolloutTarget(K8sModel):
    """Binary and version of a rollout's target."""

    binary: Annotated[str, StringConstraints(max_length=MAX_PATH)]
    version: VersionString


class RolloutRecord(K8sModel):
    """One earlier rollout: what it was for and how it went, when it was superseded."""

    generation: Annotated[int, Field(ge=0)]
    """metadata.generation of the rollout."""
    target: RolloutTarget | None = None
    phase: UpdatePhase | None = None
    """Its phase when it was superseded."""
    start_time: Time | None = None
    """Its first real VM update."""
    finish_time: Time | None = None
    """When it completed, or else when it was superseded."""
    targets: Annotated[int, Field(ge=0)] = 0
    updated: Annotated[int, Field(ge=0)] = 0
    failed: Annotated[int, Field(ge=0)] = 0
    skipped: Annotated[int, Field(ge=0)] = 0
    blocked: Annotated[int, Field(ge=0)] = 0
    pause_max_ms: Annotated[float, Field(ge=0)] | None = None
    """Its longest guest pause."""


class VMRef(K8sModel):
    """One VM named in the VMUpdate's status (in flight, or failed): where it is and why."""

    host: Name
    name: Name
    phase: VMPhase
    operation_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    message: Message | None = None


class VMUpdateStatus(K8sModel):
    """Observed state, written by the operator only."""

    phase: UpdatePhase | None = None
    """Pending, Planning, Progressing, Paused, Succeeded, Degraded, Failed or DryRunComplete."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """metadata.generation the status reflects."""
    start_time: Time | None = None
    """When the current rollout (observedGeneration) requested its first real (not dry-run)
    VM update from an agent."""
    completion_time: Time | None = None
    """When the current rollout last reached Succeeded, Degraded, Failed or DryRunComplete."""
    target: RolloutTarget | None = None
    """The target of the current rollout (spec.target of observedGeneration)."""
    history: Annotated[list[RolloutRecord], Field(max_length=MAX_HISTORY)] = Field(
        default_factory=list)
    """Earlier rollouts of this object (one per superseded generation), oldest first, the last
    MAX_HISTORY of them."""
    conditions: Annotated[
        list[Condition], Field(max_length=16, json_schema_extra=CONDITIONS_LIST)
    ] = Field(default_factory=list)
    """Ready, Progressing and Degraded."""
    targets: Annotated[int, Field(ge=0)] = 0
    """Selected VMs (one record each in the VMUpdateHost objects)."""
    updated: Annotated[int, Field(ge=0)] = 0
    """VMs running the target."""
    pending: Annotated[int, Field(ge=0)] = 0
    """VMs waiting for their turn."""
    in_progress: Annotated[int, Field(ge=0)] = 0
    """VMs in preflight or being updated."""
    failed: Annotated[int, Field(ge=0)] = 0
    """VMs that failed, rolled back, or failed a dry-run preflight."""
    skipped: Annotated[int, Field(ge=0)] = 0
    """VMs that disappeared or left the selection before their update."""
    blocked: Annotated[int, Field(ge=0)] = 0
    """VMs another VMUpdate owns (rows Blocked)."""
    dry_run_passed: Annotated[int, Field(ge=0)] = 0
    """VMs that passed a dry-run preflight."""
    pause_p50_ms: Annotated[float, Field(ge=0)] | None = None
    """Median guest pause of the updated VMs (lower median)."""
    pause_max_ms: Annotated[float, Field(ge=0)] | None = None
    """Longest guest pause of the updated VMs."""
    hosts: Annotated[int, Field(ge=0)] = 0
    """Hosts with selected VMs: one VMUpdateHost object each holds their per-VM records
    (``kubectl get vmupdatehosts -l vmupdate.dev/vmupdate=NAME``)."""
    in_progress_vms: Annotated[list[VMRef], Field(max_length=MAX_LISTED_VMS)] = Field(
        default_factory=list)
    """VMs in preflight or being updated, the first MAX_LISTED_VMS by (host, name);
    inProgress counts them all."""
    failed_vms: Annotated[list[VMRef], Field(max_length=MAX_LISTED_VMS)] = Field(
        default_factory=list)
    """Failed VMs with the reason, the first MAX_LISTED_VMS by (host, name); failed counts
    them all."""

    def counted(self, rows: Sequence[VMRolloutStatus]) -> VMUpdateStatus:
        """A copy whose counts, pause statistics and VM lists are computed from ``rows``
        (every selected VM's record, in (host, name) order)."""
        phases = [row.phase for row in rows]
        pauses = [
            row.pause_ms
            for row in rows
            if row.phase == VMPhase.UPDATED and row.pause_ms is not None
        ]
        return self.model_copy(
            update={
                "targets": len(phases),
                "updated": phases.count(VMPhase.UPDATED),
                "pending": phases.count(VMPhase.PENDING),
                "in_progress": sum(p in IN_PROGRESS_VM_PHASES for p in phases),
                "failed": sum(p in FAILED_VM_PHASES for p in phases),
                "skipped": phases.count(VMPhase.SKIPPED),
                "blocked": phases.count(VMPhase.BLOCKED),
                "dry_run_passed": phases.count(VMPhase.DRY_RUN_PASSED),
                "pause_p50_ms": statistics.median_low(pauses) if pauses else None,
                "pause_max_ms": max(pauses) if pauses else None,
                "hosts": len({row.host for row in rows}),
                "in_progress_vms": _listed(rows, IN_PROGRESS_VM_PHASES),
                "failed_vms": _listed(rows, FAILED_VM_PHASES),
            }
        )


def _listed(rows: Sequence[VMRolloutStatus], phases: frozenset[VMPhase]) -> list[VMRef]:
    out: list[VMRef] = []
    for row in rows:
        if row.phase in phases:
            out.append(VMRef(host=row.host, name=row.name, phase=row.phase,
                             operation_id=row.operation_id, message=row.message))
            if len(out) == MAX_LISTED_VMS:
                break
    return out


class VMUpdate(K8sModel):
    """Update the QEMU under running VMs in place (QEMU CPR)."""

    api_version: Literal["vmupdate.dev/v1alpha1"] = API_VERSION
    kind: Literal["VMUpdate"] = KIND_VMUPDATE
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VMUpdateSpec
    status: VMUpdateStatus | None = None


# --------------------------------------------------------------------------------------------
# VMHost
# --------------------------------------------------------------------------------------------


class QemuBinary(K8sModel):
    """A QEMU binary the agent found on the host."""

    path: Path
    """Absolute path."""
    version: VersionString | None = None
    """Version it reports (MAJOR.MINOR.MICRO)."""


class HostVM(K8sModel):
    """A VM the agent found on the host."""

    name: Name
    """VM name (QEMU's -name, else the QMP socket's file name); unique on the host."""
    uuid: Annotated[str, StringConstraints(max_length=36)] | None = None
    """QEMU's VM UUID."""
    pid: Annotated[int, Field(ge=1)] | None = None
    """QEMU process id."""
    qemu_version: VersionString | None = None
    """Version of the running QEMU."""
    binary: Path | None = None
    """Binary the QEMU process runs."""
    machine_type: Annotated[str, StringConstraints(max_length=128)] | None = None
    """Machine type, e.g. pc-q35-10.0."""
    memory_mib: Annotated[int, Field(ge=0)] | None = None
    """Guest RAM in MiB."""
    runstate: Annotated[str, StringConstraints(max_length=32)] | None = None
    """QEMU run state, e.g. running, paused."""
    cpr_modes: Annotated[list[CprMode], Field(max_length=3)] = Field(default_factory=list)
    """CPR modes this VM's QEMU supports."""
    ready: bool = False
    """True when the VM can be updated in place now."""
    not_ready_reasons: Annotated[list[Message], Field(max_length=32)] = Field(default_factory=list)
    """Why not, one reason per entry, e.g. "memory backend ram0 has share=off"."""


class VMHostSpec(K8sModel):
    """Identity of the VMHost."""

    node_name: Annotated[
        str, StringConstraints(max_length=MAX_NAME), Validations((NODE_NAME_RULE,))
    ]
    """The node this VMHost describes; equals metadata.name."""


class VMHostStatus(K8sModel):
    """Inventory and health, written by the node's agent."""

    endpoint: Annotated[str, StringConstraints(max_length=270, pattern=ENDPOINT_RE)] | None = None
    """Agent gRPC endpoint, host:port."""
    agent_version: VersionString | None = None
    """Agent version."""
    heartbeat_time: Time | None = None
    """Last time the agent refreshed this object."""
    qemu_binaries: Annotated[list[QemuBinary], Field(max_length=32)] = Field(default_factory=list)
    """QEMU binaries found on the host."""
    vms: Annotated[list[HostVM], Field(max_length=MAX_HOST_VMS)] = Field(default_factory=list)
    """VMs found on the host."""
    vm_count: Annotated[int, Field(ge=0)] = 0
    """Number of VMs (rows in vms)."""
    ready_count: Annotated[int, Field(ge=0)] = 0
    """VMs that can be updated in place now."""
    qemu_versions: Annotated[str, StringConstraints(max_length=MAX_MESSAGE)] | None = None
    """Distinct QEMU versions the VMs run, sorted, comma-separated (for kubectl get)."""
    conditions: Annotated[
        list[Condition], Field(max_length=16, json_schema_extra=CONDITIONS_LIST)
    ] = Field(default_factory=list)
    """Ready: the agent is serving and its inventory is fresh."""

    def summarize(self) -> VMHostStatus:
        """A copy whose vmCount, readyCount and qemuVersions are computed from ``vms``."""
        versions = sorted({vm.qemu_version for vm in self.vms if vm.qemu_version}, key=_version_key)
        return self.model_copy(
            update={
                "vm_count": len(self.vms),
                "ready_count": sum(vm.ready for vm in self.vms),
                "qemu_versions": ",".join(versions) if versions else None,
            }
        )


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in version.split("."))


class VMHost(K8sModel):
    """QEMU inventory of one node, kept by that node's vmupdate agent."""

    __k8s_rules__ = (
        Rule(
            cel="self.metadata.name == self.spec.nodeName",
            message="VMHost metadata.name must equal spec.nodeName: name each VMHost after "
            "its node",
            check=lambda h: h.metadata.name is None or h.metadata.name == h.spec.node_name,
            field_path=".spec.nodeName",
        ),
    )

    api_version: Literal["vmupdate.dev/v1alpha1"] = API_VERSION
    kind: Literal["VMHost"] = KIND_VMHOST
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VMHostSpec
    status: VMHostStatus | None = None


# --------------------------------------------------------------------------------------------
# VMUpdateHost
# --------------------------------------------------------------------------------------------


class VMUpdateHostSpec(K8sModel):
    """Which VMUpdate and host the records are of (set at creation)."""

    vm_update: Name
    """Name of the VMUpdate (also its owner reference)."""
    vm_update_uid: Annotated[str, StringConstraints(max_length=64)]
    """metadata.uid of that VMUpdate."""
    host: Name
    """The VMHost (node) whose VMs these are."""


class VMUpdateHostStatus(K8sModel):
    """The VMUpdate's record of each selected VM on one host, written by the operator."""

    vms: Annotated[dict[str, VMRolloutStatus], Field(
        max_length=MAX_HOST_VMS, json_schema_extra={"x-kubernetes-map-type": "atomic"})] = Field(
        default_factory=dict)
    """One record per selected VM of the host, by VM name (a map, so that the operator's
    merge patch carries only the VMs that changed; atomic for field management, which then
    tracks one field rather than every field of every record -- one writer owns them)."""
    targets: Annotated[int, Field(ge=0)] = 0
    """Selected VMs on this host."""
    updated: Annotated[int, Field(ge=0)] = 0
    """VMs running the target."""
    in_progress: Annotated[int, Field(ge=0)] = 0
    """VMs in preflight or being updated."""
    failed: Annotated[int, Field(ge=0)] = 0
    """VMs that failed, rolled back, or failed a dry-run preflight."""
    failures: Message | None = None
    """The failed VMs and why, for kubectl get: "NAME: MESSAGE; ..." (cut at 1024
    characters; each record has the whole message)."""

    def summarize(self) -> VMUpdateHostStatus:
        """A copy whose counts and failures are computed from ``vms``."""
        rows = [self.vms[k] for k in sorted(self.vms)]
        failed = [r for r in rows if r.phase in FAILED_VM_PHASES]
        text = "; ".join(f"{r.name}: {r.message or r.phase.value}" for r in failed)
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 1] + "\u2026"
        return self.model_copy(update={
            "targets": len(rows),
            "updated": sum(r.phase == VMPhase.UPDATED for r in rows),
            "in_progress": sum(r.phase in IN_PROGRESS_VM_PHASES for r in rows),
            "failed": len(failed),
            "failures": text or None,
        })


class VMUpdateHost(K8sModel):
    """A VMUpdate's per-VM records on one host (owned by the VMUpdate, written by the
    operator): the VMUpdate's own status keeps only counts and a bounded list of VMs."""

    api_version: Literal["vmupdate.dev/v1alpha1"] = API_VERSION
    kind: Literal["VMUpdateHost"] = KIND_VMUPDATEHOST
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: VMUpdateHostSpec
    status: VMUpdateHostStatus | None = None


def status_merge_patch(status: K8sModel) -> dict[str, Any]:
    """A merge patch that makes an object's ``.status`` equal ``status``: fields unset now
    are sent as null, so the patch removes them (lists are replaced whole)."""
    wire = status.to_wire()
    for name, info in type(status).model_fields.items():
        wire.setdefault(info.alias or name, None)
    return {"status": wire}
