"""The agent's configuration: one YAML file, validated, with errors that name the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from vmupdate_agent import workdirs
from vmupdate_agent.authz import Role, role_table
from vmupdate_agent.hostexec import DEFAULT_DETACH, DEFAULT_PREFIX
from vmupdate_agent.pathpolicy import allowed_dir_problem


class ConfigError(ValueError):
    pass


def _absolute(value: str, field: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{field} must be an absolute path, got {value!r}")
    if ".." in value.split("/"):
        raise ValueError(f"{field} must not contain '..', got {value!r}")
    return os.path.normpath(value)


class TlsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cert_file: str = Field(description="the agent's serving certificate (PEM)")
    key_file: str = Field(description="its private key (PEM)")
    client_ca_file: str = Field(description="CA that signs the operator's client certificates")

    @field_validator("cert_file", "key_file", "client_ca_file")
    @classmethod
    def _abs(cls, v: str, info: Any) -> str:
        return _absolute(v, f"tls.{info.field_name}")


class TimeoutsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    qmp_command_s: float = Field(10.0, gt=0, le=600)
    handover_s: float = Field(15.0, gt=0, le=600)
    load_s: float = Field(30.0, gt=0, le=600)
    guard_commit_s: float = Field(20.0, gt=0, le=600)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_name: str = Field(default_factory=lambda: os.uname().nodename, min_length=1,
                           max_length=253)
    socket_globs: list[str] = Field(min_length=1,
                                    description="where the VMs' QMP sockets are, as globs")
    allowed_binary_dirs: list[str] = Field(
        min_length=1, description="the only directories a target QEMU may come from")
    state_dir: str = Field("/var/lib/vmupdate", description="durable: the operation journal")
    runtime_dir: str = Field(
        "/run/vmupdate",
        description="state files, sockets and the guard; must be visible to QEMU at the same "
                    "path (a tmpfs shared with the VMs' root)")
    listen_address: str = "0.0.0.0:9443"
    tls: TlsConfig | None = None
    client_allowlist: list[str] = Field(
        default_factory=list, description="client certificate identities (CN or DNS/URI SAN) "
                                          "with the operator role (may call everything); the "
                                          "same as client_roles.operator")
    client_roles: dict[Role, list[str]] = Field(
        default_factory=dict,
        description="role -> client certificate identities: operator (everything), "
                    "registrar (GetInfo, ListVMs and health only)")
    host_exec_prefix: list[str] = Field(default_factory=lambda: list(DEFAULT_PREFIX))
    detach_prefix: list[str] = Field(default_factory=lambda: list(DEFAULT_DETACH))
    guard_binary: str | None = Field(
        default_factory=lambda: os.environ.get("VMUPDATE_GUARD_BINARY"),
        description="a prebuilt guard to install; built from source when absent "
                    "(default: $VMUPDATE_GUARD_BINARY, which the image sets)")
    timeouts: TimeoutsConfig = Field(default_factory=lambda: TimeoutsConfig())
    cpr_exec_guard: Literal["seize", "exec-chain"] = Field(
        "seize",
        description="how cpr-exec's guard watches the new QEMU: seize (it traces the QEMU from "
                    "before the pause, which then holds one exec; where the kernel refuses, "
                    "the exec chain) or exec-chain (QEMU execs the guard, which execs the new "
                    "QEMU: one exec more in the pause, and a rollback runs in a fork of the "
                    "QEMU itself, with its namespaces, LSM label and signal dispositions)")

    def roles(self) -> dict[str, Role]:
        """identity -> role, client_allowlist included as operators."""
        merged = {r: list(v) for r, v in self.client_roles.items()}
        merged.setdefault(Role.OPERATOR, [])
        merged[Role.OPERATOR] = [*self.client_allowlist, *merged[Role.OPERATOR]]
        return role_table(merged)

    @field_validator("client_roles")
    @classmethod
    def _one_role_each(cls, v: dict[Role, list[str]], info: Any) -> dict[Role, list[str]]:
        merged = {r: list(names) for r, names in v.items()}
        merged[Role.OPERATOR] = [*info.data.get("client_allowlist", []),
                                 *merged.get(Role.OPERATOR, [])]
        role_table(merged)  # ValueError names the identity
        return v

    @field_validator("allowed_binary_dirs")
    @classmethod
    def _dirs(cls, v: list[str]) -> list[str]:
        for d in v:
            problem = allowed_dir_problem(d)
            if problem is not None:
                raise ValueError(f"allowed_binary_dirs[] {problem}")
        return [os.path.normpath(d) for d in v]

    @field_validator("state_dir", "runtime_dir")
    @classmethod
    def _abs(cls, v: str, info: Any) -> str:
        return _absolute(v, info.field_name)

    @field_validator("runtime_dir")
    @classmethod
    def _fits(cls, v: str) -> str:
        return workdirs.check_runtime_dir(v)

    @field_validator("socket_globs")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for g in v:
            _absolute(g, "socket_globs[]")
        return v


def load(path: str | Path) -> AgentConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read agent configuration {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + describe(exc)) from exc


def describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
