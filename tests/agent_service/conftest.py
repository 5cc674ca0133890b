"""Fixtures for the agent service tests: certificates, a prebuilt guard, agent processes."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from e2e.rig import Rig, TestVM
from e2e.rig.fixtures import VMFactory
from tests.agent_service.harness import AgentFactory, AgentProcess
from tests.agent_service.pki import Pki, make_pki
from vmupdate_agent import guard


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    # Per test: the reload test rewrites the agent's certificate files.
    return make_pki(tmp_path / "pki")


@pytest.fixture(scope="session")
def guard_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guard.build(tmp_path_factory.mktemp("guard"))


@pytest_asyncio.fixture
async def agents(tmp_path: Path, pki: Pki, guard_binary: Path) -> AsyncIterator[AgentFactory]:
    factory = AgentFactory(tmp_path, pki, guard_binary)
    yield factory
    problems = await factory.close()
    assert not problems, "\n".join(problems)


@dataclass
class QemuEnv:
    """VMs of this test in their own folder, and agents that manage exactly those."""

    rig: Rig
    vms: VMFactory
    agents: AgentFactory
    vm_root: Path

    @property
    def sid_binary(self) -> str:
        return str(self.rig.sid.wrapper)

    async def vm(self, name: str, **kwargs: Any) -> TestVM:
        return await self.vms("sid", name=name, workdir=self.vm_root / name,
                              wait_ticking=True, **kwargs)

    def agent_config(self, **overrides: Any) -> dict[str, Any]:
        runtime_parent = self.rig.share / "at"
        runtime_parent.mkdir(exist_ok=True)
        return {"socket_globs": [str(self.vm_root / "*" / "qmp.sock")],
                "runtime_parent": runtime_parent,
                "allowed_binary_dirs": [str(self.rig.sid.wrapper.parent)], **overrides}

    def make_agent(self, **overrides: Any) -> AgentProcess:
        return self.agents.make(**self.agent_config(**overrides))

    async def agent(self, **overrides: Any) -> AgentProcess:
        return await self.agents.start(**self.agent_config(**overrides))


@pytest_asyncio.fixture
async def qemu_env(rig: Rig, vm_factory: VMFactory, agents: AgentFactory
                   ) -> AsyncIterator[QemuEnv]:
    vm_root = rig.vms_dir / f"as-{secrets.token_hex(3)}"
    vm_root.mkdir()
    env = QemuEnv(rig, vm_factory, agents, vm_root)
    try:
        yield env
    finally:
        # Agents first (they may hold a VM's monitor), then the VMs, then their folder.
        problems = await agents.close()
        await vm_factory.close()
        shutil.rmtree(vm_root, ignore_errors=True)
    assert not problems, "\n".join(problems)


@pytest.fixture
def empty_globs(tmp_path: Path) -> Iterator[list[str]]:
    d = tmp_path / "no-vms"
    d.mkdir()
    yield [str(d / "*" / "qmp.sock")]
