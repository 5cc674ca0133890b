"""Run the node agent: `python -m vmupdate_agent.server --config /etc/vmupdate/agent.yaml`.

The agent serves mutual TLS only (there is no plaintext port), with gRPC health checking and
server reflection next to the NodeAgent service. Before it serves it becomes a child
subreaper and reaps orphans (the VMs' helper processes may be re-parented to it, and PID 1
does not reap on every host), installs the cpr-exec guard where QEMU can exec it, stops
probes a previous agent left behind, and resolves the operations that agent left running.

On SIGTERM or SIGINT it stops accepting updates, lets the running ones finish (bounded by
the sum of the engine's timeouts, after which the VM would have been resolved by the engine
anyway), then stops the server. An agent killed outright resolves its operations on the
next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# health.aio.HealthServicer, under the name the typing sees.
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from vmupdate_agent import engine, hostexec, reaper
from vmupdate_agent.authz import AuthorizationInterceptor, Role
from vmupdate_agent.config import AgentConfig, ConfigError, load
from vmupdate_agent.journal import Journal
from vmupdate_agent.modes.common import Timeouts, kill_quietly, pids_with_arg
from vmupdate_agent.operations import Operations
from vmupdate_agent.servicer import NodeAgentService
from vmupdate_agent.tls import CertificateFiles, TlsError
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_api.gen import agent_v1_pb2_grpc as pb_grpc

log = logging.getLogger("vmupdate_agent.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NodeAgent"].full_name
# Requests are small (the largest, an UpdateRequest, is bounded field by field far below
# this); anything bigger is refused by gRPC before it is parsed.
MAX_RECEIVE_BYTES = 1 << 20
MAX_SEND_BYTES = 64 << 20  # ListVMs of a host with many VMs
STOP_GRACE_S = 5.0


def engine_settings(config: AgentConfig, guard_path: str | None) -> engine.EngineSettings:
    t = config.timeouts
    return engine.EngineSettings(
        allowed_dirs=tuple(config.allowed_binary_dirs), runtime_dir=config.runtime_dir,
        guard_path=guard_path, guard_seize=config.cpr_exec_guard == "seize",
        host=hostexec.HostContext(prefix=tuple(config.host_exec_prefix),
                                  detach=tuple(config.detach_prefix)),
        timeouts=Timeouts(command=t.qmp_command_s, handover=t.handover_s, load=t.load_s,
                          guard_commit=t.guard_commit_s))


def drain_timeout(timeouts: Timeouts) -> float:
    """How long a running update may still take: every phase's bound, plus room to verify."""
    return timeouts.handover + timeouts.load + timeouts.guard_commit + 3 * timeouts.command + 10


def check_serving_config(config: AgentConfig) -> None:
    if config.tls is None:
        raise ConfigError("tls: required; the agent serves mutual TLS only (cert_file, "
                          "key_file, client_ca_file)")
    if not config.roles():
        raise ConfigError("client_roles: empty; name the operator's client certificate "
                          "identity (CN or SAN) under client_roles.operator (or "
                          "client_allowlist), or no one may call the agent")


async def stop_leftover_probes(runtime_dir: str) -> None:
    """Probes and dry runs of a previous agent that died while running them (QEMUs that wait
    paused on a monitor in the runtime dir nobody will connect to)."""
    for kind in ("probe-", "dry-run-"):
        for pid in pids_with_arg(os.path.join(runtime_dir, kind)):
            if pid != os.getpid():
                log.warning("stopping pid %d, a %s QEMU left behind", pid, kind.rstrip("-"))
                await kill_quietly(pid)


def build_server(service: NodeAgentService, health_servicer: AsyncHealthServicer,
                 roles: dict[str, Role]) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[AuthorizationInterceptor(roles)],
        options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                 ("grpc.max_send_message_length", MAX_SEND_BYTES),
                 # Fail loudly if another process serves this port already.
                 ("grpc.so_reuseport", 0),
                 ("grpc.keepalive_time_ms", 30_000),
                 ("grpc.keepalive_permit_without_calls", 1),
                 ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
    pb_grpc.add_NodeAgentServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return server


async def serve(config: AgentConfig, *, stop: asyncio.Event,
                on_ready: Callable[[int], None] | None = None) -> None:
    """Run the agent until `stop` is set; `on_ready(port)` once it accepts connections."""
    check_serving_config(config)
    assert config.tls is not None
    reaper.become_subreaper()
    orphans = asyncio.create_task(reaper.OrphanReaper().run(), name="orphan-reaper")
    try:
        await _serve(config, stop, on_ready)
    finally:
        orphans.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await orphans


async def _serve(config: AgentConfig, stop: asyncio.Event,
                 on_ready: Callable[[int], None] | None) -> None:
    assert config.tls is not None
    files = CertificateFiles(config.tls)
    credentials = files.server_credentials()  # fails early on unusable certificates
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    # Traversable (not listable): QEMUs running as a VM's user reach their own work folders.
    os.makedirs(config.runtime_dir, mode=0o711, exist_ok=True)
    guard_path = await asyncio.to_thread(engine.install_guard, config.runtime_dir,
                                         config.guard_binary)
    await asyncio.to_thread(engine.cleanup_workdirs, config.runtime_dir)
    await stop_leftover_probes(config.runtime_dir)
    settings = engine_settings(config, guard_path)
    operations = Operations(config, Journal(config.state_dir), settings)
    await operations.start()

    health_servicer = AsyncHealthServicer()
    server = build_server(NodeAgentService(operations, config), health_servicer,
                          config.roles())
    port = server.add_secure_port(config.listen_address, credentials)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("vmupdate agent on %s serving mutual TLS on %s (port %d); guard %s",
             config.node_name, config.listen_address, port, guard_path)
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new updates; waiting for running ones")
        await health_servicer.enter_graceful_shutdown()
        if not await operations.drain(drain_timeout(settings.timeouts)):
            log.error("operations %s still run; they are resolved on the next start",
                      operations.running)
        await server.stop(STOP_GRACE_S)
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmupdate-agent-server",
                                     description="vmupdate node agent: the gRPC service")
    parser.add_argument("--config", required=True, help="the agent's YAML configuration")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"vmupdate-agent: {exc}", file=sys.stderr)
        return 2
    return main_with_config(config)


def main_with_config(config: AgentConfig) -> int:
    """Serve until SIGTERM/SIGINT (also `vmupdate-agent serve`); 2 on unusable settings."""
    # qemu.qmp logs every refused connection while the engine waits for a new QEMU.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        check_serving_config(config)
        asyncio.run(_run_until_signalled(config))
    except (ConfigError, TlsError) as exc:
        print(f"vmupdate-agent: {exc}", file=sys.stderr)
        return 2
    return 0


async def _run_until_signalled(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop=stop)


if __name__ == "__main__":
    sys.exit(main())
