"""The fleet benchmark's simulated agent, driven by the real operator's agent client over
the real agent's mutual TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from bench.simagent import Failures, Replay, SimAgent, make_vms, replay_from_record, serve
from tests.agent_service.pki import Pki, make_pki
from tests.bench import sample
from vmupdate_agent.config import TlsConfig
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_operator.agent_client import AgentClient, AgentError, ClientTls

TARGET = "/usr/lib/qemu-new/qemu-system-x86_64"
FAST = Replay().scaled(0.05)


@dataclass
class Running:
    agent: SimAgent
    port: int
    pki: Pki


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Running]:
    pki = make_pki(tmp_path / "pki")
    agent = SimAgent("node-a", make_vms("node-a", 4, binary="/usr/bin/qemu-old",
                                        version=(10, 0, 2)),
                     replay=FAST, failures=Failures(names=frozenset({"node-a-vm2"})))
    tls = TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                    client_ca_file=str(pki.ca.path))
    server, port = await serve(agent, tls, pki.ALLOWLIST)
    try:
        yield Running(agent, port, pki)
    finally:
        await server.stop(0)


async def client(sim: Running, *, as_intruder: bool = False) -> AgentClient:
    who = sim.pki.intruder if as_intruder else sim.pki.operator
    return await AgentClient.connect(
        f"127.0.0.1:{sim.port}", ClientTls(ca_file=str(sim.pki.ca.path),
                                           cert_file=str(who.cert), key_file=str(who.key)),
        timeout=10)


def request(op_id: str, vm: str) -> pb.UpdateRequest:
    return pb.UpdateRequest(operation_id=op_id, vm=vm, target=pb.Target(binary=TARGET),
                            mode=pb.MODE_AUTO)


async def test_update_replays_phases_and_the_vm_then_runs_the_target(sim: Running) -> None:
    async with await client(sim) as c:
        await c.wait_ready(10)
        assert (await c.negotiate()) == "v1"
        events: list[pb.OperationEvent] = []
        result = await c.update(request("op-1", "node-a-vm0"), on_event=events.append)
        assert result.outcome == pb.OUTCOME_UPDATED and result.version_after == "11.1.3"
        assert result.pause_ms == pytest.approx(FAST.pause_ms)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        phases = [e.progress.phase for e in events if e.HasField("progress")]
        assert phases[:2] == [pb.PHASE_ACCEPTED, pb.PHASE_PREFLIGHT]
        assert phases[-1] == pb.PHASE_FINISHED and events[-1].HasField("result")
        vms = {vm.name: vm for vm in (await c.list_vms()).vms}
        assert vms["node-a-vm0"].binary == TARGET and vms["node-a-vm0"].version.major == 11
        assert vms["node-a-vm1"].binary == "/usr/bin/qemu-old"


async def test_an_operation_id_runs_once_and_can_be_followed(sim: Running) -> None:
    async with await client(sim) as c:
        first, again = await asyncio.gather(c.update(request("op-2", "node-a-vm1")),
                                            c.update(request("op-2", "node-a-vm1")))
        assert first == again and sim.agent.updates_run == 1
        op = await c.get_operation("op-2")
        assert op.state == pb.OPERATION_STATE_DONE and op.result == first
        assert op.vm_name == "node-a-vm1"


async def test_an_injected_failure_leaves_the_old_qemu(sim: Running) -> None:
    async with await client(sim) as c:
        result = await c.update(request("op-3", "node-a-vm2"))
        assert result.outcome == pb.OUTCOME_FAILED and "injected" in result.message
        vm = next(v for v in (await c.list_vms()).vms if v.name == "node-a-vm2")
        assert vm.binary == "/usr/bin/qemu-old" and vm.version.major == 10


async def test_unknown_vm_and_operation_are_not_found(sim: Running) -> None:
    async with await client(sim) as c:
        for call in (c.update(request("op-4", "nope")), c.get_operation("never")):
            with pytest.raises(AgentError) as err:
                await call
            assert err.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_client_outside_the_allowlist_is_refused(sim: Running) -> None:
    async with await client(sim, as_intruder=True) as c:
        with pytest.raises(AgentError) as err:
            await c.list_vms()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_made_up_vms_are_distinct_and_stable() -> None:
    a = make_vms("n", 50, binary="/b", version=(1, 2, 3))
    assert len({vm.uuid for vm in a}) == 50 and len({vm.name for vm in a}) == 50
    assert [vm.uuid for vm in a] == [vm.uuid for vm in make_vms("n", 50, binary="/b",
                                                                 version=(1, 2, 3))]
    assert {vm.uuid for vm in a}.isdisjoint(vm.uuid for vm in make_vms("m", 50, binary="/b",
                                                                        version=(1, 2, 3)))


def test_failures_by_name_and_every_nth() -> None:
    f = Failures(names=frozenset({"x"}), every=3)
    assert [f.fails(i, "y") for i in range(6)] == [False, False, True, False, False, True]
    assert f.fails(0, "x") and not Failures().fails(2, "y")


def test_replay_from_a_pause_record() -> None:
    r = replay_from_record(sample.results()[0])
    assert r.mode == "cpr-exec" and r.pause_ms == 55.0
    assert r.phases == (("start", 10.0), ("stopping", 21.0), ("execed", 30.0), ("saved", 5.0))
    with pytest.raises(ValueError, match="not a CPR case"):
        replay_from_record(sample.results()[3])
    empty = {**sample.results()[0], "phase_ms": []}
    with pytest.raises(ValueError, match="no agent rounds"):
        replay_from_record(empty)
