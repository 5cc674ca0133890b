"""The operator's flags and their environment variables."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from vmupdate_operator import config


def test_defaults() -> None:
    cfg = config.from_args([], environ={})
    assert cfg.agent_tls is None and cfg.peering_name == "vmupdate" and not cfg.standalone
    assert config.PRIORITY_RANGE[0] <= cfg.priority <= config.PRIORITY_RANGE[1]
    assert cfg.host_stale_after == timedelta(seconds=60) and cfg.metrics_port == 8080


def test_two_replicas_do_not_tie() -> None:
    priorities = {config.from_args([], environ={}).priority for _ in range(20)}
    assert len(priorities) > 1


def test_flags_and_environment() -> None:
    env = {"VMUPDATE_AGENT_CA_FILE": "/ca", "VMUPDATE_AGENT_CERT_FILE": "/c",
           "VMUPDATE_AGENT_KEY_FILE": "/k", "VMUPDATE_PRIORITY": "7",
           "VMUPDATE_HOST_STALE_AFTER": "30"}
    cfg = config.from_args(["--metrics-port", "0", "--agent-server-name", "{node}",
                            "--peering-lifetime", "15"], environ=env)
    assert cfg.agent_tls is not None
    assert cfg.agent_tls.for_host("node-a").server_name == "node-a"
    assert (cfg.priority, cfg.metrics_port, cfg.peering_lifetime_s) == (7, 0, 15)
    assert cfg.host_stale_after == timedelta(seconds=30)


@pytest.mark.parametrize("argv", [
    ["--agent-ca-file", "/ca"],
    ["--resync", "0"],
    ["--peering-lifetime", "2"],
])
def test_bad_settings(argv: list[str]) -> None:
    with pytest.raises(config.ConfigError):
        config.from_args(argv, environ={})


@pytest.mark.parametrize(("account", "message"), [
    (None, "--agent-service-account NAMESPACE/NAME"),
    ("vmupdate-agent", "--agent-service-account NAMESPACE/NAME"),
    ("/vmupdate-agent", "--agent-service-account NAMESPACE/NAME"),
    ("ns/", "--agent-service-account NAMESPACE/NAME"),
    ("ns/a/b", "--agent-service-account NAMESPACE/NAME"),
])
def test_signer_needs_the_agents_service_account(account: str | None, message: str) -> None:
    argv = ["--agent-signer-ca-dir", "/etc/vmupdate/signer"]
    if account is not None:
        argv += ["--agent-service-account", account]
    with pytest.raises(config.ConfigError, match=message):
        config.from_args(argv, environ={})


def test_signer_settings() -> None:
    cfg = config.from_args(["--agent-signer-ca-dir", "/ca", "--agent-service-account",
                            "vmupdate/vmupdate-agent"], environ={})
    assert (cfg.signer_ca_dir, cfg.agent_user) == (
        "/ca", "system:serviceaccount:vmupdate:vmupdate-agent")
    assert config.from_args([], environ={}).signer_ca_dir is None


def test_an_unreadable_signing_ca_stops_the_operator_at_start(tmp_path: Path,
                                                               capsys: Any) -> None:
    from vmupdate_operator import main

    (tmp_path / "tls.crt").write_text("not a certificate")
    (tmp_path / "tls.key").write_text("not a key")
    for folder in (tmp_path, tmp_path / "missing"):
        assert main.main(["--agent-signer-ca-dir", str(folder), "--agent-service-account",
                          "ns/sa"]) == 2
        assert "--agent-signer-ca-dir" in capsys.readouterr().err
