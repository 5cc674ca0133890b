"""The engine as the agent runs it, with its runtime dir inside the rig's share (which the
sid root sees at the same path), and the guard built once per session."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.rig import Rig
from vmupdate_agent import engine
from vmupdate_agent import guard as cpr_guard
from vmupdate_agent.modes.common import Timeouts


@pytest.fixture(scope="session")
def built_guard(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cpr_guard.ensure_built(tmp_path_factory.mktemp("guard"))


@pytest.fixture
def runtime_dir(rig: Rig) -> Iterator[Path]:
    d = Path(rig.share) / "agent-test" / uuid.uuid4().hex[:8]
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_engine(rig: Rig, runtime_dir: Path, guard: Path | None, *,
                allowed: tuple[str, ...] = ()) -> engine.Engine:
    guard_path = engine.install_guard(str(runtime_dir), str(guard)) if guard else None
    return engine.Engine(engine.EngineSettings(
        allowed_dirs=(str(Path(rig.share) / "bin"), *allowed),
        runtime_dir=str(runtime_dir), guard_path=guard_path,
        timeouts=Timeouts(command=10, handover=30, load=60, guard_commit=30)))


@pytest.fixture
def agent(rig: Rig, runtime_dir: Path, built_guard: Path) -> engine.Engine:
    return make_engine(rig, runtime_dir, built_guard)
