"""The operator's flags and their environment variables."""

from __future__ import annotations

from datetime import timedelta

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
