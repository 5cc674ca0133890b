"""Devices given in a -readconfig file are part of the command line: a real QEMU with one is
not refused as "hot-plugged", and keeps the device across an update (the new QEMU reads the
same file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e.rig import Rig
from e2e.rig.fixtures import VMFactory
from tests.agent.test_cpr_qemu import sid, started, update
from vmupdate_agent import discovery, engine
from vmupdate_agent.models import Outcome, RequestedMode, Target
from vmupdate_agent.qmp import QmpSession

pytestmark = pytest.mark.qemu

CONFIG = """# devices of this VM
[device "rng0"]
  driver = "virtio-rng-pci"
"""


async def peripherals(qmp_path: str) -> list[str]:
    async with await QmpSession.open(qmp_path, timeout=10, command_timeout=10) as s:
        raw = await discovery.gather_raw(s)
    assert discovery.unplugged_devices(raw) == []
    assert discovery.hotplugged_devices(raw) == []
    return list(raw["peripherals"])


async def test_devices_from_readconfig_are_on_the_command_line(
        rig: Rig, vm_factory: VMFactory, agent: engine.Engine, runtime_dir: Path) -> None:
    cfg = runtime_dir / "vm-devices.cfg"  # in the share: the chrooted QEMU sees this path
    cfg.write_text(CONFIG)
    vm = await started(vm_factory, "sid", extra_args=["-readconfig", str(cfg)])
    assert "rng0" in await peripherals(str(vm.qmp_path))

    report = await agent.preflight(str(vm.qmp_path), Target(binary=sid(rig)),
                                   RequestedMode.CPR_EXEC)
    [check] = [c for c in report.checks if c.name == "hotplugged-devices"]
    assert check.passed, check.message
    assert report.passed, [c.message for c in report.failures()]

    result = await update(agent, vm, sid(rig), "cpr-exec")
    assert result.outcome == Outcome.UPDATED, result.message
    assert "rng0" in await peripherals(str(vm.qmp_path))
    vm.serial.assert_continuous()
