"""The operator's settings: command-line flags, each with an environment variable default."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from vmupdate_operator.agents import AgentTls

PEERING_NAME = "vmupdate"
# Equal peering priorities pause every operator (kopf cannot tell who should act), so each
# replica picks a distinct one unless told: the highest live priority acts, the others
# stand by and take over when its keep-alive expires (after the peering lifetime).
PRIORITY_RANGE = (1, 1_000_000)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class OperatorConfig:
    agent_tls: AgentTls | None
    metrics_port: int = 8080
    metrics_address: str = "0.0.0.0"
    health_port: int = 0
    peering_name: str = PEERING_NAME
    standalone: bool = False
    priority: int = 0
    peering_lifetime_s: int = 60
    host_stale_after: timedelta = timedelta(seconds=60)
    resync_s: float = 10.0
    agent_call_timeout_s: float = 30.0
    update_timeout_s: float = 900.0
    deletion_wait_s: float = 900.0
    log_level: str = "INFO"
    signer_ca_dir: str | None = None
    """tls.crt and tls.key of the CA that signs the agents' serving certificates."""
    agent_user: str | None = None
    """The agents' ServiceAccount user (system:serviceaccount:NS:NAME): the only requester."""


def _env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return environ.get(f"VMUPDATE_{name}", default)


def parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = dict(os.environ if environ is None else environ)
    p = argparse.ArgumentParser(
        prog="vmupdate-operator",
        description="Converges VMUpdate objects: updates the QEMU under running VMs through "
                    "the node agents. Every flag has an environment variable VMUPDATE_<FLAG>.")
    tls = p.add_argument_group("agent mutual TLS")
    tls.add_argument("--agent-ca-file", default=_env(env, "AGENT_CA_FILE"),
                     help="CA of the agents' serving certificates")
    tls.add_argument("--agent-cert-file", default=_env(env, "AGENT_CERT_FILE"),
                     help="the operator's client certificate (its identity is in the agents' "
                          "client_allowlist)")
    tls.add_argument("--agent-key-file", default=_env(env, "AGENT_KEY_FILE"))
    tls.add_argument("--agent-server-name", default=_env(env, "AGENT_SERVER_NAME"),
                     help="name to verify agents' certificates against; {node} is the "
                          "VMHost name (default: the endpoint's host)")
    signer = p.add_argument_group("agents' serving certificates (CSR signer "
                                  "vmupdate.dev/agent-serving)")
    signer.add_argument("--agent-signer-ca-dir", default=_env(env, "AGENT_SIGNER_CA_DIR"),
                        help="folder with tls.crt and tls.key of the signing CA; sign the "
                             "agents' CSRs (off when not given)")
    signer.add_argument("--agent-service-account", default=_env(env, "AGENT_SERVICE_ACCOUNT"),
                        help="NAMESPACE/NAME of the agents' ServiceAccount (the only "
                             "requester whose CSRs are approved)")
    p.add_argument("--metrics-port", type=int,
                   default=int(_env(env, "METRICS_PORT", "8080") or 0),
                   help="Prometheus /metrics port; 0 turns it off")
    p.add_argument("--metrics-address", default=_env(env, "METRICS_ADDRESS", "0.0.0.0"))
    p.add_argument("--health-port", type=int, default=int(_env(env, "HEALTH_PORT", "0") or 0),
                   help="kopf liveness endpoint /healthz on this port; 0 turns it off")
    peering = p.add_argument_group("high availability (kopf peering)")
    peering.add_argument("--peering-name", default=_env(env, "PEERING_NAME", PEERING_NAME),
                         help="the ClusterKopfPeering object the replicas share")
    peering.add_argument("--priority", type=int, default=_int_or_none(_env(env, "PRIORITY")),
                         help="this replica's peering priority: the highest live one acts "
                              "(default: random, so two replicas never tie)")
    peering.add_argument("--peering-lifetime", type=int,
                         default=int(_env(env, "PEERING_LIFETIME", "60") or 60),
                         help="seconds a replica's keep-alive counts; a standby takes over "
                              "this long after the active replica died")
    peering.add_argument("--standalone", action="store_true",
                         default=_env(env, "STANDALONE", "") in ("1", "true", "yes"),
                         help="no peering (one replica only, e.g. development)")
    p.add_argument("--host-stale-after", type=float,
                   default=float(_env(env, "HOST_STALE_AFTER", "60") or 60),
                   help="seconds without a VMHost heartbeat after which its VMs are "
                        "unavailable")
    p.add_argument("--resync", type=float, default=float(_env(env, "RESYNC", "10") or 10),
                   help="seconds between reconciles of a VMUpdate when nothing happens")
    p.add_argument("--update-timeout", type=float,
                   default=float(_env(env, "UPDATE_TIMEOUT", "900") or 900),
                   help="seconds to follow one VM's update before reattaching")
    p.add_argument("--deletion-wait", type=float,
                   default=float(_env(env, "DELETION_WAIT", "900") or 900),
                   help="seconds a deleted VMUpdate waits for its running updates")
    p.add_argument("--log-level", default=_env(env, "LOG_LEVEL", "INFO"))
    return p


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
              ) -> OperatorConfig:
    args = parser(environ).parse_args(argv)
    files = (args.agent_ca_file, args.agent_cert_file, args.agent_key_file)
    if any(files) and not all(files):
        raise ConfigError("--agent-ca-file, --agent-cert-file and --agent-key-file go together")
    agent_tls = (AgentTls(ca_file=args.agent_ca_file, cert_file=args.agent_cert_file,
                          key_file=args.agent_key_file, server_name=args.agent_server_name)
                 if all(files) else None)
    for name in ("host_stale_after", "resync", "update_timeout", "deletion_wait"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.peering_lifetime < 5:
        raise ConfigError("--peering-lifetime must be at least 5 seconds")
    agent_user = None
    if args.agent_signer_ca_dir:
        ns, sep, name = (args.agent_service_account or "").partition("/")
        if not (sep and ns and name and "/" not in name):
            raise ConfigError("--agent-signer-ca-dir needs --agent-service-account "
                              "NAMESPACE/NAME (the agents' ServiceAccount)")
        agent_user = f"system:serviceaccount:{ns}:{name}"
    priority = args.priority if args.priority is not None else random.randint(*PRIORITY_RANGE)
    return OperatorConfig(
        agent_tls=agent_tls, metrics_port=args.metrics_port,
        metrics_address=args.metrics_address, health_port=args.health_port,
        peering_name=args.peering_name, standalone=args.standalone, priority=priority,
        peering_lifetime_s=args.peering_lifetime,
        host_stale_after=timedelta(seconds=args.host_stale_after), resync_s=args.resync,
        update_timeout_s=args.update_timeout, deletion_wait_s=args.deletion_wait,
        log_level=args.log_level, signer_ca_dir=args.agent_signer_ca_dir,
        agent_user=agent_user)
