"""Discovery against real QEMU: what it learns of a VM's QEMU, and what it leaves there.

It never asks the VM's QEMU for its QMP schema (that answer grows a QEMU's heap by tens of
MiB for good, which a cpr-exec's exec then frees inside the pause): the CPR modes come from
the modes QEMU accepts, the out-of-tree dialect from the parameter it knows, and the VM's
own migration mode is put back afterwards. While the QEMU migrates, its parameters are not
touched and preflight says why no update can start.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from e2e.rig import Rig
from e2e.rig.fixtures import VMFactory
from tests.agent.test_cpr_qemu import started
from vmupdate_agent import discovery, preflight
from vmupdate_agent.qmp import QmpSession

pytestmark = pytest.mark.qemu


def anon_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


class CommandLog:
    """Wraps a real session's `cmd`: the commands discovery sent, in order."""

    def __init__(self, session: QmpSession) -> None:
        self.sent: list[tuple[str, dict[str, Any] | None]] = []
        self._cmd = session.cmd

        async def cmd(command: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
            self.sent.append((command, args))
            return await self._cmd(command, args, **kw)

        session.cmd = cmd  # type: ignore[method-assign]


@pytest.mark.parametrize(("flavour", "modes"), [
    ("sid", ["cpr-reboot", "cpr-transfer", "cpr-exec"]),
    ("backports", ["cpr-reboot", "cpr-transfer"]),
])
async def test_modes_are_asked_by_name_not_from_the_schema(
        rig: Rig, vm_factory: VMFactory, flavour: str, modes: list[str]) -> None:
    vm = await started(vm_factory, flavour)
    async with await QmpSession.open(str(vm.qmp_path), timeout=10, command_timeout=10) as s:
        await s.cmd("migrate-set-parameters", {"mode": "cpr-reboot"})  # the VM's own choice
        log = CommandLog(s)
        rss_before = anon_rss_kib(vm.pid)
        raw = await discovery.gather_raw(s)
        grown_kib = anon_rss_kib(vm.pid) - rss_before
        after = await s.cmd("query-migrate-parameters")
    assert raw["cpr_modes"] == modes
    assert raw["legacy_dialect"] is False
    assert raw["migration-status"] == "none"
    assert sorted(raw["blockers"]) == sorted(modes)
    assert "query-qmp-schema" not in [c for c, _ in log.sent]
    # The schema's answer grew it by 23 MiB; what discovery asks now, by tens of KiB.
    assert grown_kib < 8 * 1024, f"discovery grew QEMU's heap by {grown_kib} KiB"
    assert after["mode"] == "cpr-reboot", "discovery left another migration mode selected"
    info = discovery.build_vm_info(raw)
    assert [m.value for m in info.features.cpr_modes] == modes
    assert info.features.has_cpr_exec_command is ("cpr-exec" in modes)


async def test_a_migrating_qemu_is_left_alone_and_refused(rig: Rig,
                                                          vm_factory: VMFactory) -> None:
    vm = await started(vm_factory, "sid")
    state = vm.workdir / "slow-migration"
    async with await QmpSession.open(str(vm.qmp_path), timeout=10, command_timeout=10) as s:
        # 1 byte/s: the migration stays active until it is cancelled.
        await s.cmd("migrate-set-parameters", {"max-bandwidth": 1, "mode": "normal"})
        await s.cmd("migrate", {"uri": f"file:{state}"})
        try:
            log = CommandLog(s)
            raw = await discovery.gather_raw(s)
        finally:
            await s.cmd("migrate_cancel")
        assert raw["migration-status"] == "active"
        assert not [a for c, a in log.sent if c == "migrate-set-parameters"], (
            "discovery changed the parameters of a running migration")
        info = discovery.build_vm_info(raw)
        report = preflight.readiness(info)
        assert not report.ready
        assert any("already migrating" in r and "migrate_cancel" in r for r in report.reasons)
        assert not any("does not support" in r for r in report.reasons), report.reasons
        # The guest runs on after the cancel.
        await vm.serial.wait_ticks(3, after=time.monotonic_ns(), timeout=30)
        status = await s.cmd("query-status")
    assert status["status"] == "running"
