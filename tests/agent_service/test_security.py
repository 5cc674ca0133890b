"""Mutual TLS only, the client identity allowlist, and certificates reloaded from disk."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.agent_service.harness import AgentFactory, AgentProcess, journal_files
from tests.agent_service.pki import Issued, Pki, issue
from vmupdate_agent.config import ConfigError, load
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_api.gen import agent_v1_pb2_grpc as pb_grpc
from vmupdate_operator.agent_client import AgentClient, AgentError, ClientTls, RetryPolicy

ONE_TRY = RetryPolicy(attempts=1)


async def peer_certificate(agent: AgentProcess) -> x509.Certificate:
    """The certificate the agent presents to a new connection (read, not verified)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(agent.pki.operator.cert, agent.pki.operator.key)
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", agent.port, ssl=ctx), 10)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
    return x509.load_der_x509_certificate(der)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def test_allowed_client_is_served(agents: AgentFactory, empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client()
    info = await client.get_info()
    assert info.node_name == "test-node"
    assert list(info.api_versions) == ["v1"]
    assert info.agent_version
    assert list(info.allowed_binary_dirs) == ["/nonexistent/allowed"]
    assert info.started_at.seconds > 0
    assert await client.negotiate() == "v1"
    listed = await client.list_vms()
    assert list(listed.vms) == [] and list(listed.unreachable) == []


async def test_plaintext_and_certless_clients_are_refused(agents: AgentFactory,
                                                          empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    async with grpc.aio.insecure_channel(agent.target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.NodeAgentStub(plain).GetInfo(pb.GetInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # TLS, trusting the agent, but without a client certificate: the handshake fails.
    server_only = grpc.ssl_channel_credentials(root_certificates=agent.pki.ca.path.read_bytes())
    async with grpc.aio.secure_channel(agent.target, server_only) as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.NodeAgentStub(no_cert).GetInfo(pb.GetInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client certificate with the allowed name but from another CA.
    stranger = await AgentClient.connect(agent.target, agent.tls(agent.pki.stranger),
                                         retry=ONE_TRY)
    async with stranger:
        with pytest.raises(AgentError) as agent_err:
            await stranger.get_info(timeout=5)
    assert agent_err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_unknown_identity_is_refused_on_every_service(agents: AgentFactory,
                                                            empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    intruder = await agent.client(agent.pki.intruder, retry=ONE_TRY)
    for call in (intruder.get_info(), intruder.list_vms(), intruder.get_operation("op-1")):
        with pytest.raises(AgentError) as err:
            await call
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "intruder" in err.value.details and "not allowed" in err.value.details
    with pytest.raises(AgentError) as err:
        await intruder.wait_ready(timeout=5)  # health: refused too, and at once
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    events = intruder.stub.Update(pb.UpdateRequest(operation_id="x"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as rpc_err:
        async for _ in events:
            pass
    assert rpc_err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await asyncio.to_thread(reflected_services, agent, agent.pki.intruder) is None


async def test_identity_by_uri_san_and_reflection(agents: AgentFactory,
                                                  empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    spiffe = await agent.client(agent.pki.spiffe)  # CN not allowed, its URI SAN is
    assert (await spiffe.get_info()).node_name == "test-node"
    await spiffe.wait_ready(timeout=10)
    services = await asyncio.to_thread(reflected_services, agent, agent.pki.operator)
    assert services is not None
    assert {"vmupdate.agent.v1.NodeAgent", "grpc.health.v1.Health"} <= set(services)


def reflected_services(agent: AgentProcess, who: Issued) -> list[str] | None:
    """Services listed by server reflection (a blocking client, run in a thread)."""
    tls = agent.tls(who)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca_file).read_bytes(),
        private_key=Path(tls.key_file).read_bytes(),
        certificate_chain=Path(tls.cert_file).read_bytes())
    with grpc.secure_channel(agent.target, creds) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        try:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            return None


async def test_health_reports_serving(agents: AgentFactory, empty_globs: list[str]) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    client = await agent.client()
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "vmupdate.agent.v1.NodeAgent"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def eventually_presents(agent: AgentProcess, cn: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = common_name(await peer_certificate(agent))
        if seen == cn:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"agent still presents {seen!r}, expected {cn!r}:\n{agent.log()[-3000:]}")


async def test_certificate_files_are_reloaded(agents: AgentFactory, empty_globs: list[str],
                                              pki: Pki) -> None:
    agent = await agents.start(socket_globs=empty_globs)
    assert common_name(await peer_certificate(agent)) == "vmupdate-agent"
    old_client = await agent.client()
    await old_client.get_info()

    # Rotate the serving certificate and key in place (same CA).
    folder = pki.server.cert.parent
    issue(pki.ca, folder, "agent", "vmupdate-agent-rotated", dns=("localhost",),
          ips=("127.0.0.1",))
    await eventually_presents(agent, "vmupdate-agent-rotated")
    fresh = await agent.client()
    assert (await fresh.get_info()).node_name == "test-node"

    # Rotate to a certificate from another CA: new connections present it, so clients that
    # trust only the old CA are refused and clients that trust the new one are served.
    issue(pki.stranger_ca, folder, "agent", "vmupdate-agent-new-ca", dns=("localhost",),
          ips=("127.0.0.1",))
    await eventually_presents(agent, "vmupdate-agent-new-ca")
    old_trust = await AgentClient.connect(agent.target, agent.tls(), retry=ONE_TRY)
    async with old_trust:
        with pytest.raises(AgentError) as err:
            await old_trust.get_info(timeout=5)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    new_trust = await AgentClient.connect(
        agent.target, ClientTls(ca_file=str(pki.stranger_ca.path), cert_file=str(
            pki.operator.cert), key_file=str(pki.operator.key)))
    async with new_trust:
        assert (await new_trust.get_info()).node_name == "test-node"

    # A broken rotation (a key that does not match) keeps the last good certificate.
    pki.server.key.write_bytes(pki.intruder.key.read_bytes())
    await asyncio.sleep(0.2)
    assert common_name(await peer_certificate(agent)) == "vmupdate-agent-new-ca"
    assert "not usable" in agent.log()


# --- per-RPC roles -----------------------------------------------------------------------

REGISTRAR_ROLES = {"operator": ["vmupdate-operator"], "registrar": ["vmupdate-registrar"]}


async def test_the_registrar_role_reads_the_inventory_only(agents: AgentFactory, pki: Pki,
                                                           tmp_path: Path,
                                                           empty_globs: list[str]) -> None:
    """The registrar's identity (a real certificate of the agent's client CA) may call
    GetInfo, ListVMs and health; Update, Preflight, WatchOperation, GetOperation and
    reflection are PERMISSION_DENIED naming its role; the operator still may call them."""
    registrar_cert = issue(pki.ca, tmp_path / "pki-registrar", "registrar", "vmupdate-registrar")
    agent = await agents.start(socket_globs=empty_globs, client_allowlist=[],
                               client_roles=REGISTRAR_ROLES)
    registrar = await agent.client(registrar_cert, retry=ONE_TRY)
    assert (await registrar.get_info()).node_name == "test-node"
    assert list((await registrar.list_vms()).vms) == []
    await registrar.wait_ready(timeout=10)

    def denied(err: AgentError | grpc.aio.AioRpcError, rpc: str) -> bool:
        code = err.code if isinstance(err, AgentError) else err.code()
        details = err.details if isinstance(err, AgentError) else (err.details() or "")
        return (code == grpc.StatusCode.PERMISSION_DENIED and "role registrar" in details
                and f"may not call vmupdate.agent.v1.NodeAgent/{rpc}" in details)

    target = pb.Target(binary="/nonexistent/allowed/qemu-system-x86_64")
    with pytest.raises(grpc.aio.AioRpcError) as update_err:
        async for _ in registrar.stub.Update(pb.UpdateRequest(
                operation_id="op-1", vm="vm1", target=target, mode=pb.MODE_AUTO), timeout=10):
            raise AssertionError("the registrar got an Update event")
    assert denied(update_err.value, "Update"), update_err.value
    with pytest.raises(AgentError) as err:
        await registrar.preflight(pb.PreflightRequest(vm="vm1", target=target,
                                                      mode=pb.MODE_AUTO))
    assert denied(err.value, "Preflight"), err.value
    with pytest.raises(AgentError) as err:
        async for _ in registrar.watch("op-1", timeout=10):
            raise AssertionError("the registrar got a WatchOperation event")
    assert denied(err.value, "WatchOperation"), err.value
    with pytest.raises(AgentError) as err:
        await registrar.get_operation("op-1")
    assert denied(err.value, "GetOperation"), err.value
    assert await asyncio.to_thread(reflected_services, agent, registrar_cert) is None
    assert journal_files(agent) == []

    # The operator's identity on the same agent reaches the service (a VM it does not have).
    operator = await agent.client(retry=ONE_TRY)
    with pytest.raises(AgentError) as err:
        await operator.preflight(pb.PreflightRequest(vm="vm1", target=target,
                                                     mode=pb.MODE_AUTO))
    assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value
    with pytest.raises(AgentError) as err:
        await operator.get_operation("op-1")
    assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value


async def test_an_identity_with_two_roles_is_a_configuration_error(
        agents: AgentFactory, empty_globs: list[str]) -> None:
    agent = agents.make(socket_globs=empty_globs, client_allowlist=["vmupdate-operator"],
                        client_roles={"registrar": ["vmupdate-operator"]})
    with pytest.raises(ConfigError, match="listed under two roles"):
        load(agent.config_path)


# --- per-node agent identity ------------------------------------------------------------


async def test_the_operator_checks_the_agent_is_the_node_it_meant(
        agents: AgentFactory, pki: Pki, tmp_path: Path, empty_globs: list[str]) -> None:
    """An agent serving node-a's certificate (a DNS SAN node-a): the operator, checking the
    certificate against the node it meant ("{node}" in agentServerName), is served when it
    meant node-a and refused in the handshake when it meant node-b, though it dials the same
    address (a stale or redirected endpoint)."""
    from vmupdate_operator.agents import AgentTls

    # (127.0.0.1 too: the harness checks readiness by address.)
    node_a = issue(pki.ca, tmp_path / "pki-node-a", "node-a", "vmupdate-agent-node-a",
                   dns=("node-a",), ips=("127.0.0.1",))
    agent = await agents.start(socket_globs=empty_globs, tls={
        "cert_file": str(node_a.cert), "key_file": str(node_a.key),
        "client_ca_file": str(pki.ca.path)})
    tls = AgentTls(ca_file=str(pki.ca.path), cert_file=str(pki.operator.cert),
                   key_file=str(pki.operator.key), server_name="{node}")
    meant_a = await AgentClient.connect(agent.target, tls.for_host("node-a"), retry=ONE_TRY)
    try:
        assert (await meant_a.get_info()).node_name == "test-node"
    finally:
        await meant_a.close()
    meant_b = await AgentClient.connect(agent.target, tls.for_host("node-b"), retry=ONE_TRY)
    try:
        with pytest.raises(AgentError) as err:
            await meant_b.get_info(timeout=5)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await meant_b.close()
