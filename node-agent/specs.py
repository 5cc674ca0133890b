"""What an accepted request is: pydantic specs, checked field by field, without the wire.

The gRPC edge (convert.py) builds these from what a client sent; the journal stores an
accepted update's spec as part of its on-disk record. Nothing here knows the protobuf
messages, so a change to the proto cannot change the journal's format.
"""

from __future__ import annotations

import hashlib
import os
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vmupdate_agent.models import Preference, RequestedMode, Target
from vmupdate_api import extra_args

# The operation id names a journal file and a runtime folder: no '/', no leading dot.
OPERATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_PATH = 4096
MAX_EXTRA_ARGS = extra_args.MAX_EXTRA_ARGS
MAX_ARG = 4096
MAX_TEXT = 256
# Upper bounds of per-update timeouts: the same as the agent's configuration accepts
# (TimeoutsConfig; a test keeps them equal).
MAX_COMMAND_S = 600.0
MAX_PHASE_S = 600.0
MAX_PAUSE_BUDGET_MS = 600_000


# --- specs ----------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _plain_text(value: str, *, limit: int) -> str:
    if len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; at most {limit} are accepted")
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError("contains control characters")
    return value


def _absolute_path(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"is empty: give the absolute path of {what}")
    _plain_text(value, limit=MAX_PATH)
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    if ".." in value.split("/"):
        raise ValueError(f"must not contain '..', got {value!r}")
    return os.path.normpath(value)


class TargetSpec(_Spec):
    binary: str
    expected_version: str = ""
    sha256: str = ""
    extra_args: tuple[str, ...] = Field((), max_length=MAX_EXTRA_ARGS)

    @field_validator("binary")
    @classmethod
    def _binary(cls, v: str) -> str:
        return _absolute_path(v, "the new QEMU inside the VM's root")

    @field_validator("expected_version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _plain_text(v, limit=MAX_TEXT)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, v: str) -> str:
        if v and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hexadecimal digits (or empty for no check)")
        return v.lower()

    @field_validator("extra_args")
    @classmethod
    def _args(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, arg in enumerate(v):
            if not arg:
                raise ValueError(f"[{i}] is empty")
            if len(arg) > MAX_ARG or "\x00" in arg:
                raise ValueError(f"[{i}] is longer than {MAX_ARG} characters or holds NUL")
        problems = extra_args.problems(v, "")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    def to_target(self) -> Target:
        return Target(binary=self.binary, expected_version=self.expected_version or None,
                      sha256=self.sha256 or None, extra_args=self.extra_args)


class TimeoutsSpec(_Spec):
    """Per-update overrides of the agent's timeouts (None: the agent's configured value)."""

    qmp_command_seconds: float | None = Field(None, gt=0, le=MAX_COMMAND_S)
    handover_seconds: float | None = Field(None, gt=0, le=MAX_PHASE_S)
    load_seconds: float | None = Field(None, gt=0, le=MAX_PHASE_S)
    guard_commit_seconds: float | None = Field(None, gt=0, le=MAX_PHASE_S)


class PreflightSpec(_Spec):
    """A Preflight request: which VM, which target, which mode (and what Auto values)."""

    vm: str
    target: TargetSpec
    mode: RequestedMode
    prefer: Preference = Preference.SAME_PID  # journals written before it hold none

    @field_validator("vm")
    @classmethod
    def _vm(cls, v: str) -> str:
        if not v:
            raise ValueError("is empty: give a VM name, uuid or QMP socket path")
        return _plain_text(v, limit=MAX_PATH)


class UpdateSpec(PreflightSpec):
    """An accepted Update request, as journaled: a preflight's questions plus the update's."""

    operation_id: str
    timeouts: TimeoutsSpec = TimeoutsSpec()
    pause_budget_ms: int = Field(0, ge=0, le=MAX_PAUSE_BUDGET_MS)

    @field_validator("operation_id")
    @classmethod
    def _operation_id(cls, v: str) -> str:
        if not v:
            raise ValueError("is empty: every update needs an id chosen by the caller")
        if not OPERATION_ID.fullmatch(v):
            raise ValueError(f"{v[:140]!r} is not 1-128 characters of [A-Za-z0-9._-] starting "
                             "with a letter or digit")
        return v

    def fingerprint(self) -> str:
        """Identifies what was asked, to tell a retry from a different request with the same id.

        The default preference is left out, so a request journaled before the field existed
        keeps its fingerprint."""
        skip = {"prefer"} if self.prefer == Preference.SAME_PID else None
        return hashlib.sha256(self.model_dump_json(exclude=skip).encode()).hexdigest()
