"""The agent's domain models: versions, derived properties, strictness, enum spellings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError

from vmupdate_agent.models import (
    CheckResult,
    CprMode,
    MemoryBackend,
    Outcome,
    PreflightReport,
    QemuVersion,
    RequestedMode,
    UpdateResult,
    VMInfo,
)

VmLoader = Callable[[str], VMInfo]


@pytest.mark.parametrize(("version", "text"), [
    (QemuVersion(major=11, minor=1, micro=3, package="Debian 1:11.1.3+ds-1"), "11.1.3"),
    (QemuVersion(major=10, minor=0, micro=2), "10.0.2"),
])
def test_version_str_has_no_package(version: QemuVersion, text: str) -> None:
    assert str(version) == text


@pytest.mark.parametrize(("version", "need", "ok"), [
    ((11, 1, 3), (11,), True),
    ((11, 1, 3), (11, 1), True),
    ((11, 1, 3), (11, 2), False),
    ((11, 1, 3), (10, 2), True),
    ((11, 1, 3), (12, 0), False),
    ((10, 1, 0), (10, 1), True),
    ((10, 0, 99), (10, 1), False),
    ((10, 2, 0), (10, 10), False),
    ((10, 10, 0), (10, 2), True),
])
def test_version_at_least(version: tuple[int, int, int], need: tuple[int, ...],
                          ok: bool) -> None:
    v = QemuVersion(major=version[0], minor=version[1], micro=version[2])
    assert v.at_least(*need) is ok


def test_models_are_frozen_and_strict() -> None:
    v = QemuVersion(major=1, minor=2, micro=3)
    with pytest.raises(ValidationError):
        v.major = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        QemuVersion.model_validate({"major": 1, "minor": 2, "micro": 3, "patch": 4})
    with pytest.raises(ValidationError):
        MemoryBackend.model_validate({"id": "m", "kind": "hugepages", "size_bytes": 1,
                                      "share": True})


def test_memory_bytes_sums_every_backend(load_vm: VmLoader) -> None:
    vm = load_vm("raw-sid-11.1.3-memfd")
    assert vm.memory_bytes == 256 << 20
    two = vm.model_copy(update={"memory_backends": (
        *vm.memory_backends, MemoryBackend(id="ram1", kind="file", size_bytes=1 << 30,
                                           share=True))})
    assert two.memory_bytes == (256 << 20) + (1 << 30)
    assert vm.model_copy(update={"memory_backends": ()}).memory_bytes == 0


def test_vm_info_json_round_trip(load_vm: VmLoader) -> None:
    for name in ("raw-sid-11.1.3-memfd", "tap-fd-vhost-vhostfd", "vfio-pci-iommufd"):
        vm = load_vm(name)
        assert VMInfo.model_validate_json(vm.model_dump_json()) == vm


def report(mode: CprMode | None, *passed: bool) -> PreflightReport:
    return PreflightReport(vm="vm1", target="/t", mode=mode, mode_reason="r", checks=tuple(
        CheckResult(name=f"c{i}", passed=p, message="ok" if p else "bad")
        for i, p in enumerate(passed)))


@pytest.mark.parametrize(("r", "passed", "failed"), [
    pytest.param(report(CprMode.CPR_EXEC, True, True), True, [], id="all-pass"),
    pytest.param(report(CprMode.CPR_EXEC), True, [], id="no-checks"),
    pytest.param(report(CprMode.CPR_EXEC, True, False, True, False), False, ["c1", "c3"],
                 id="some-fail"),
    pytest.param(report(None, True, True), False, [], id="no-mode"),
])
def test_report_passed_and_failures(r: PreflightReport, passed: bool, failed: list[str]) -> None:
    assert r.passed is passed
    assert [c.name for c in r.failures()] == failed


def test_mode_spellings_are_qapis() -> None:
    assert [m.value for m in CprMode] == ["cpr-exec", "cpr-transfer", "cpr-reboot"]
    assert [m.value for m in RequestedMode] == ["auto", *(m.value for m in CprMode)]
    for m in CprMode:
        assert CprMode(RequestedMode(m.value).value) is m
    assert str(CprMode.CPR_EXEC) == "cpr-exec"
    assert Outcome.ROLLED_BACK.value == "rolled-back"


def test_update_result_phase_times_are_not_shared() -> None:
    def result() -> UpdateResult:
        return UpdateResult(vm="vm1", outcome=Outcome.UPDATED, mode=CprMode.CPR_EXEC,
                            message="m", pid_before=1, pid_after=1, version_before="10.0.2",
                            version_after="11.1.3")
    a, b = result(), result()
    a.phase_ms["saved"] = 1.0
    assert b.phase_ms == {}
