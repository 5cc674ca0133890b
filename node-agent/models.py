"""The agent's domain: what discovery knows about a VM, what preflight says, what an update did.

Plain pydantic models with no I/O. The gRPC service and the VMHost status are built from
these, so every consumer sees the same facts under the same names.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CprMode(enum.StrEnum):
    """QEMU's MigMode values the agent can drive (the QAPI spelling)."""

    CPR_EXEC = "cpr-exec"
    CPR_TRANSFER = "cpr-transfer"
    CPR_REBOOT = "cpr-reboot"


class RequestedMode(enum.StrEnum):
    """What a caller may ask for: one mode, or let the agent choose."""

    AUTO = "auto"
    CPR_EXEC = "cpr-exec"
    CPR_TRANSFER = "cpr-transfer"
    CPR_REBOOT = "cpr-reboot"


class Preference(enum.StrEnum):
    """What Auto values when the VM could go either way: the same pid (cpr-exec; the new
    QEMU's start-up falls inside the pause) or the shortest pause (cpr-transfer; the new
    QEMU starts before the guest stops, and the VM gets a new pid). Named modes ignore it."""

    SAME_PID = "same-pid"
    SHORTEST_PAUSE = "shortest-pause"


class MemoryBackend(_Model):
    id: str
    kind: Literal["memfd", "file", "ram", "other"]
    size_bytes: int
    share: bool
    mem_path: str | None = None


class TapDevice(_Model):
    """A tap netdev and how QEMU got it: by name (reopened, so busy after exec) or by fd."""

    id: str
    ifname: str | None = None
    fd: int | None = None
    vhost: bool = False
    vhostfd: int | None = None


class QemuVersion(_Model):
    major: int
    minor: int
    micro: int
    package: str = ""

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)


class QemuFeatures(_Model):
    """What a QEMU binary (old or new) supports, learnt over QMP."""

    version: QemuVersion
    cpr_modes: tuple[CprMode, ...]
    # The out-of-tree dialect (-migrate-mode-enable, cpr-exec-args) some distributions ship.
    legacy_cpr_dialect: bool = False
    has_cpr_exec_command: bool = False


# A QEMU's migration status (query-migrate) once its migration has ended, either way; and
# when none is running (it may start another).
MIGRATION_ENDED = frozenset({"completed", "failed", "cancelled"})
MIGRATION_IDLE = MIGRATION_ENDED | {"none"}


class VMInfo(_Model):
    """Everything discovery learnt about one running QEMU."""

    qmp_path: str
    pid: int
    name: str
    uuid: str
    argv: tuple[str, ...]
    # Root directory of the QEMU process as seen from the agent (/proc/<pid>/root); binary
    # paths in requests are interpreted inside it, so a chrooted or containerised QEMU works.
    root: str
    binary: str
    features: QemuFeatures
    runstate: str
    # Of a migration this QEMU sends or receives ("none" when it never migrated).
    migration_status: str = "none"
    machine_type: str
    memory_backends: tuple[MemoryBackend, ...]
    aux_ram_share: bool | None
    migration_blockers: tuple[str, ...] = ()
    # QEMU keeps blockers per migration mode (RAM not shared blocks cpr-transfer only).
    blockers_by_mode: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    enabled_capabilities: tuple[str, ...] = ()
    taps: tuple[TapDevice, ...] = ()
    vfio_devices: tuple[str, ...] = ()
    iommufd_objects: tuple[str, ...] = ()
    vhost_devices: tuple[str, ...] = ()
    device_drivers: tuple[str, ...] = ()
    # The device, chardev and netdev sections of its -readconfig files, as command-line words.
    readconfig_options: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return sum(b.size_bytes for b in self.memory_backends)


class Readiness(_Model):
    """Whether a VM can be updated by CPR at all, independent of any target."""

    ready: bool
    modes: tuple[CprMode, ...]
    reasons: tuple[str, ...]


class CheckResult(_Model):
    name: str
    passed: bool
    message: str


class PreflightReport(_Model):
    vm: str
    target: str
    mode: CprMode | None
    mode_reason: str
    checks: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return self.mode is not None and all(c.passed for c in self.checks)

    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if not c.passed)


class Target(_Model):
    """The QEMU a VM should run after the update."""

    binary: str = Field(description="absolute path of the new QEMU, inside the VM's root")
    expected_version: str | None = None
    sha256: str | None = None
    extra_args: tuple[str, ...] = ()


class Phase(enum.StrEnum):
    ACCEPTED = "accepted"
    PREFLIGHT = "preflight"
    STOPPING = "stopping"
    SAVED = "saved"
    EXECED = "execed"
    TRANSFERRED = "transferred"
    RESUMED = "resumed"
    VERIFIED = "verified"
    FINISHED = "finished"
    FAILED = "failed"
    RECOVERED = "recovered"


class Outcome(enum.StrEnum):
    UPDATED = "updated"
    # Nothing was changed: refused before the point of no return; the old QEMU runs on.
    FAILED = "failed"
    # The new QEMU failed after the exec; the guard restarted the old one on the preserved state.
    ROLLED_BACK = "rolled-back"
    # The VM could not be brought back. Never expected; reported loudly if it happens.
    LOST = "lost"


class ProgressEvent(_Model):
    phase: Phase
    time_ns: int
    message: str
    # QEMU's STOP timestamp (wall clock, ns), on the events after the guest was stopped:
    # journaled, so an operation finished by a restarted agent still reports its pause.
    guest_stopped_ns: int | None = None


class UpdateResult(_Model):
    vm: str
    outcome: Outcome
    mode: CprMode | None
    mode_reason: str = ""
    message: str
    pid_before: int
    pid_after: int | None
    version_before: str
    version_after: str | None
    pause_ms: float | None = None
    # When the guest was stopped and resumed, from QEMU's own STOP and RESUME events
    # (wall clock, ns since the epoch): the pause is their difference.
    paused_at_ns: int | None = None
    resumed_at_ns: int | None = None
    phase_ms: dict[str, float] = Field(default_factory=dict)
    preflight: PreflightReport | None = None
