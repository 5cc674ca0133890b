"""The agent's configuration: validation, and load() errors that name the field and the file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vmupdate_agent import config
from vmupdate_agent.config import AgentConfig, ConfigError
from vmupdate_agent.hostexec import DEFAULT_DETACH, DEFAULT_PREFIX

MINIMAL: dict[str, Any] = {
    "socket_globs": ["/run/vms/*/qmp.sock"],
    "allowed_binary_dirs": ["/usr/lib/qemu-new"],
}
TLS = {"cert_file": "/etc/vmupdate/tls.crt", "key_file": "/etc/vmupdate/tls.key",
       "client_ca_file": "/etc/vmupdate/ca.crt"}


def with_(**update: Any) -> dict[str, Any]:
    return {**MINIMAL, **update}


def test_defaults() -> None:
    c = AgentConfig.model_validate(MINIMAL)
    assert c.socket_globs == ["/run/vms/*/qmp.sock"]
    assert c.allowed_binary_dirs == ["/usr/lib/qemu-new"]
    assert c.node_name == os.uname().nodename
    assert c.state_dir == "/var/lib/vmupdate"
    assert c.runtime_dir == "/run/vmupdate"
    assert c.listen_address == "0.0.0.0:9443"
    assert c.tls is None
    assert c.client_allowlist == []
    assert c.host_exec_prefix == list(DEFAULT_PREFIX)
    assert c.detach_prefix == list(DEFAULT_DETACH)
    assert c.guard_binary is None
    assert c.cpr_exec_guard == "seize"
    t = c.timeouts
    assert (t.qmp_command_s, t.handover_s, t.load_s, t.guard_commit_s) == (10.0, 15.0, 30.0,
                                                                            20.0)


def test_defaults_are_not_shared_between_configs() -> None:
    a = AgentConfig.model_validate(MINIMAL)
    a.host_exec_prefix.append("x")
    a.client_allowlist.append("y")
    b = AgentConfig.model_validate(MINIMAL)
    assert b.host_exec_prefix == list(DEFAULT_PREFIX) and b.client_allowlist == []
    assert a.timeouts is not b.timeouts


def test_everything_set() -> None:
    c = AgentConfig.model_validate(with_(
        node_name="node-a", state_dir="/var/lib/vmupdate-a/", runtime_dir="/run//vmupdate-a",
        allowed_binary_dirs=["/opt/qemu/", "/usr/lib//qemu-new"], tls=TLS,
        client_allowlist=["vmupdate-operator"], guard_binary="/opt/vmupdate/guard",
        cpr_exec_guard="exec-chain", timeouts={"qmp_command_s": 5, "handover_s": 600, "load_s": 0.5,
                  "guard_commit_s": 30}))
    assert c.node_name == "node-a"
    # Paths come out normalised, so prefix checks on them are exact.
    assert c.state_dir == "/var/lib/vmupdate-a"
    assert c.runtime_dir == "/run/vmupdate-a"
    assert c.allowed_binary_dirs == ["/opt/qemu", "/usr/lib/qemu-new"]
    assert c.tls is not None and c.tls.key_file == "/etc/vmupdate/tls.key"
    assert c.timeouts.handover_s == 600 and c.timeouts.load_s == 0.5
    assert c.cpr_exec_guard == "exec-chain"


@pytest.mark.parametrize(("data", "where", "what"), [
    pytest.param({"allowed_binary_dirs": ["/opt"]}, "socket_globs", "Field required",
                 id="socket-globs-missing"),
    pytest.param(with_(socket_globs=[]), "socket_globs", "at least 1 item",
                 id="socket-globs-empty"),
    pytest.param(with_(socket_globs=["run/vms/*.sock"]), "socket_globs",
                 "socket_globs[] must be an absolute path, got 'run/vms/*.sock'",
                 id="socket-glob-relative"),
    pytest.param(with_(socket_globs=["/run/../*.sock"]), "socket_globs",
                 "socket_globs[] must not contain '..'", id="socket-glob-dotdot"),
    pytest.param({"socket_globs": ["/run/*.sock"]}, "allowed_binary_dirs", "Field required",
                 id="allowed-missing"),
    pytest.param(with_(allowed_binary_dirs=[]), "allowed_binary_dirs", "at least 1 item",
                 id="allowed-empty"),
    pytest.param(with_(allowed_binary_dirs=["/opt", "usr/lib"]), "allowed_binary_dirs",
                 "allowed_binary_dirs[] must be an absolute path, got 'usr/lib'",
                 id="allowed-relative"),
    pytest.param(with_(allowed_binary_dirs=["/opt/../etc"]), "allowed_binary_dirs",
                 "allowed_binary_dirs[] must not contain '..', got '/opt/../etc'",
                 id="allowed-dotdot"),
    pytest.param(with_(allowed_binary_dirs=["/opt", "/"]), "allowed_binary_dirs",
                 "allowed_binary_dirs[] '/' would allow every binary on the host",
                 id="allowed-root"),
    pytest.param(with_(allowed_binary_dirs=["//"]), "allowed_binary_dirs",
                 "allowed_binary_dirs[] '/' would allow every binary", id="allowed-root-2"),
    pytest.param(with_(client_roles={"operator": ["a"], "registrar": ["a"]}), "client_roles",
                 "client identity 'a' is listed under two roles", id="two-roles"),
    pytest.param(with_(state_dir="var/lib/vmupdate"), "state_dir",
                 "state_dir must be an absolute path", id="state-dir-relative"),
    pytest.param(with_(runtime_dir="/run/vmupdate/.."), "runtime_dir",
                 "runtime_dir must not contain '..'", id="runtime-dir-dotdot"),
    pytest.param(with_(tls={**TLS, "cert_file": "tls.crt"}), "tls.cert_file",
                 "tls.cert_file must be an absolute path", id="tls-cert-relative"),
    pytest.param(with_(tls={**TLS, "client_ca_file": "/etc/../ca.crt"}), "tls.client_ca_file",
                 "tls.client_ca_file must not contain '..'", id="tls-ca-dotdot"),
    pytest.param(with_(tls={"cert_file": "/a", "client_ca_file": "/c"}), "tls.key_file",
                 "Field required", id="tls-key-missing"),
    pytest.param(with_(tls={**TLS, "password": "x"}), "tls.password",
                 "Extra inputs are not permitted", id="tls-unknown-key"),
    pytest.param(with_(cpr_exec_guard="ptrace"), "cpr_exec_guard",
                 "Input should be 'seize' or 'exec-chain'", id="cpr-exec-guard-unknown"),
    pytest.param(with_(timeouts={"qmp_command_s": 0}), "timeouts.qmp_command_s",
                 "greater than 0", id="timeout-zero"),
    pytest.param(with_(timeouts={"qmp_command_s": 601}), "timeouts.qmp_command_s",
                 "less than or equal to 600", id="timeout-qmp-too-long"),
    pytest.param(with_(timeouts={"handover_s": 601}), "timeouts.handover_s",
                 "less than or equal to 600", id="timeout-handover-too-long"),
    pytest.param(with_(timeouts={"load_s": -1}), "timeouts.load_s", "greater than 0",
                 id="timeout-negative"),
    pytest.param(with_(timeouts={"guard_commit_s": "soon"}), "timeouts.guard_commit_s",
                 "valid number", id="timeout-not-a-number"),
    pytest.param(with_(timeouts={"handover": 5}), "timeouts.handover",
                 "Extra inputs are not permitted", id="timeout-typo"),
    pytest.param(with_(socket_glob=["/run/*.sock"]), "socket_glob",
                 "Extra inputs are not permitted", id="top-level-typo"),
    pytest.param(with_(node_name=""), "node_name", "at least 1 character", id="node-name-empty"),
    pytest.param(with_(node_name="n" * 254), "node_name", "at most 253 characters",
                 id="node-name-too-long"),
    pytest.param(with_(socket_globs="/run/*.sock"), "socket_globs", "valid list",
                 id="socket-globs-not-a-list"),
])
def test_invalid(data: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(ValidationError) as info:
        AgentConfig.model_validate(data)
    text = config.describe(info.value)
    assert f"{where}" in text
    assert what in text
    # describe() puts the field first: "<dotted location>: <message>".
    assert any(part.startswith(where) and what in part for part in text.split("; "))


def test_describe_lists_every_error() -> None:
    with pytest.raises(ValidationError) as info:
        AgentConfig.model_validate({"socket_globs": [], "state_dir": "x"})
    parts = config.describe(info.value).split("; ")
    assert [p.split(":", 1)[0] for p in parts] == ["socket_globs", "allowed_binary_dirs",
                                                    "state_dir"]


def test_describe_top_level() -> None:
    with pytest.raises(ValidationError) as info:
        AgentConfig.model_validate(["not", "a", "mapping"])
    assert config.describe(info.value).startswith("(top level): ")


# --- load() -----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_load(tmp_path: Path) -> None:
    path = write(tmp_path, """
socket_globs: [/run/vms/*/qmp.sock]
allowed_binary_dirs:
  - /usr/lib/qemu-new/
timeouts:
  handover_s: 30
""")
    c = config.load(path)
    assert c.allowed_binary_dirs == ["/usr/lib/qemu-new"]
    assert c.timeouts.handover_s == 30
    assert config.load(str(path)) == c


@pytest.mark.parametrize(("text", "what"), [
    pytest.param("socket_globs: [/run/*.sock\n", "is not valid YAML", id="bad-yaml"),
    pytest.param("- /run/*.sock\n", "must hold a mapping of settings, got list", id="a-list"),
    pytest.param("just words\n", "must hold a mapping of settings, got str", id="a-string"),
    pytest.param("", "must hold a mapping of settings, got NoneType", id="empty-file"),
    pytest.param("socket_globs: [/run/*.sock]\nallowed_binary_dirs: [opt]\n",
                 ": allowed_binary_dirs: Value error, allowed_binary_dirs[] must be an "
                 "absolute path, got 'opt'", id="invalid-field"),
    pytest.param("socket_globs: [/run/*.sock]\nallowed_binary_dirs: [/opt]\n"
                 "timeouts: {load_s: 0}\n",
                 ": timeouts.load_s: Input should be greater than 0", id="invalid-nested-field"),
])
def test_load_errors_name_the_file(tmp_path: Path, text: str, what: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert str(path) in message
    assert what in message


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError,
                       match=re.escape(f"cannot read agent configuration {path}: No such file")):
        config.load(path)


def test_load_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError,
                       match=re.escape(f"cannot read agent configuration {tmp_path}: ")):
        config.load(tmp_path)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
