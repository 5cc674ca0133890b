"""The spec of a VMUpdate, what a user writes: which VMs (selector), which QEMU (target), how
(mode, strategy), each field with its admission rules.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

from vmupdate_api import extra_args as allowlist
from vmupdate_api.crd.constants import MAX_MESSAGE, MAX_NAME, MAX_PATH
from vmupdate_api.crd.meta import K8sModel
from vmupdate_api.crd.rules import (
    BINARY_RULES,
    EXTRA_ARGS_RULE,
    HOST_NAME_RULE,
    LABEL_VALUE_RE,
    LIST_SET,
    QEMU_VERSION_SELECTOR_RULE,
    SHA256_RULE,
    TARGET_VERSION_RULE,
    VM_NAME_RULE,
    Rule,
    Validations,
    unique_values,
)


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
            AfterValidator(unique_values),
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
            AfterValidator(unique_values),
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
            AfterValidator(unique_values),
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
