"""Conversion between the API's protobuf messages and the agent's pydantic models."""

from __future__ import annotations

import hashlib

import pytest

from vmupdate_agent import convert, specs
from vmupdate_agent.convert import InvalidRequest
from vmupdate_agent.journal import OperationRecord, OperationState
from vmupdate_agent.models import (
    CheckResult,
    CprMode,
    MemoryBackend,
    Outcome,
    Phase,
    Preference,
    PreflightReport,
    ProgressEvent,
    QemuFeatures,
    QemuVersion,
    Readiness,
    RequestedMode,
    TapDevice,
    UpdateResult,
    VMInfo,
)
from vmupdate_api.gen import agent_v1_pb2 as pb

VM = VMInfo(
    qmp_path="/run/vms/a/qmp.sock", pid=42, name="a", uuid="u-1", argv=("qemu", "-S"),
    root="/", binary="/usr/bin/qemu-system-x86_64",
    features=QemuFeatures(version=QemuVersion(major=11, minor=1, micro=3, package="deb"),
                          cpr_modes=(CprMode.CPR_EXEC, CprMode.CPR_TRANSFER),
                          has_cpr_exec_command=True),
    runstate="running", machine_type="pc-q35-10.0",
    memory_backends=(MemoryBackend(id="ram0", kind="memfd", size_bytes=256 << 20, share=True),),
    aux_ram_share=None, taps=(TapDevice(id="n0", fd=7), TapDevice(id="n1", ifname="tap1")),
    device_drivers=("virtio-net-pci",))


def full_request() -> pb.UpdateRequest:
    return pb.UpdateRequest(
        operation_id="op-1", vm="a", mode=pb.MODE_CPR_EXEC,
        target=pb.Target(binary="/opt/qemu//bin/./qemu", expected_version="11.1.3",
                         sha256="AB" * 32, extra_args=["-msg", "timestamp=on"]),
        timeouts=pb.Timeouts(handover_seconds=30, guard_commit_seconds=5),
        pause_budget_ms=250)


def test_every_engine_enum_value_has_a_proto_value() -> None:
    assert set(convert.PHASES) == set(Phase)
    assert set(convert.OUTCOMES) == set(Outcome)
    assert {convert.mode_to_pb(m) for m in CprMode} == {
        pb.MODE_CPR_EXEC, pb.MODE_CPR_TRANSFER, pb.MODE_CPR_REBOOT}
    assert convert.mode_to_pb(None) == pb.MODE_UNSPECIFIED
    # Names line up, so the two enums cannot drift apart silently.
    for phase, value in convert.PHASES.items():
        assert pb.Phase.Name(value) == f"PHASE_{phase.name}"


def test_update_request_round_trip() -> None:
    spec = convert.update_spec(full_request())
    assert spec.mode == RequestedMode.CPR_EXEC
    assert spec.target.binary == "/opt/qemu/bin/qemu"  # normalised
    assert spec.target.sha256 == "ab" * 32
    assert spec.timeouts.handover_seconds == 30 and spec.timeouts.load_seconds is None
    target = spec.target.to_target()
    assert (target.expected_version, target.extra_args) == ("11.1.3", ("-msg", "timestamp=on"))
    back = convert.spec_to_pb(spec)
    assert convert.update_spec(back) == spec
    assert back.timeouts.load_seconds == 0  # "agent default" stays unset


@pytest.mark.parametrize(("value", "expected"), [
    (pb.PREFERENCE_UNSPECIFIED, Preference.SAME_PID), (pb.PREFERENCE_SAME_PID, Preference.SAME_PID),
    (pb.PREFERENCE_SHORTEST_PAUSE, Preference.SHORTEST_PAUSE)])
def test_preference_in_and_back(value: int, expected: Preference) -> None:
    for build in (full_request, lambda: pb.PreflightRequest(
            vm="a", target=pb.Target(binary="/q"), mode=pb.MODE_AUTO)):
        msg = build()
        msg.prefer = value  # type: ignore[assignment]
        spec = (convert.update_spec(msg) if isinstance(msg, pb.UpdateRequest)
                else convert.preflight_spec(msg))
        assert spec.prefer == expected
    spec = convert.update_spec(full_request())
    spec = spec.model_copy(update={"prefer": expected})
    assert convert.update_spec(convert.spec_to_pb(spec)) == spec


def test_unknown_preference_is_refused_by_name() -> None:
    msg = full_request()
    msg.prefer = 7  # type: ignore[assignment]
    msg.mode = 99  # type: ignore[assignment]
    with pytest.raises(InvalidRequest) as info:
        convert.update_spec(msg)
    text = str(info.value)
    assert "prefer: unknown preference 7" in text and "PREFERENCE_SHORTEST_PAUSE" in text
    assert "mode: unknown mode 99" in text  # every wrong field in one message


def test_fingerprint_keeps_its_value_for_the_default_preference() -> None:
    # A request journaled before `prefer` existed has the same fingerprint when sent again.
    spec = convert.update_spec(full_request())
    dumped = spec.model_dump_json(exclude={"prefer"})
    assert spec.fingerprint() == hashlib.sha256(dumped.encode()).hexdigest()
    shortest = spec.model_copy(update={"prefer": Preference.SHORTEST_PAUSE})
    assert shortest.fingerprint() != spec.fingerprint()


def test_fingerprint_tells_requests_apart() -> None:
    a = convert.update_spec(full_request())
    assert a.fingerprint() == convert.update_spec(full_request()).fingerprint()
    changed = full_request()
    changed.target.extra_args[1] = "timestamp=off"
    assert convert.update_spec(changed).fingerprint() != a.fingerprint()


def test_validation_messages_name_the_fields() -> None:
    bad = full_request()
    bad.target.binary = "relative"
    bad.timeouts.load_seconds = -2
    with pytest.raises(InvalidRequest) as err:
        convert.update_spec(bad)
    message = str(err.value)
    assert "target.binary: must be an absolute path, got 'relative'" in message
    assert "timeouts.load_seconds: Input should be greater than 0" in message
    with pytest.raises(InvalidRequest, match=r"^target: is required"):
        convert.preflight_spec(pb.PreflightRequest(vm="a", mode=pb.MODE_AUTO))
    with pytest.raises(InvalidRequest, match=r"^operation_id: '\.\./x' is not"):
        convert.operation_id("../x")


def test_vm_to_pb() -> None:
    readiness = Readiness(ready=True, modes=(CprMode.CPR_EXEC,), reasons=())
    msg = convert.vm_to_pb(VM, readiness, busy_operation_id="op-9")
    assert (msg.name, msg.pid, msg.version.package) == ("a", 42, "deb")
    assert list(msg.cpr_modes) == [pb.MODE_CPR_EXEC, pb.MODE_CPR_TRANSFER]
    assert not msg.HasField("aux_ram_share")  # unknown, not False
    assert msg.memory_bytes == 256 << 20
    assert msg.taps[0].HasField("fd") and not msg.taps[1].HasField("fd")
    assert msg.readiness.ready and list(msg.readiness.modes) == [pb.MODE_CPR_EXEC]
    assert msg.busy_operation_id == "op-9"


def result(**changes: object) -> UpdateResult:
    base = UpdateResult(vm="a", outcome=Outcome.UPDATED, mode=CprMode.CPR_EXEC, message="ok",
                        pid_before=42, pid_after=42, version_before="10.0.2",
                        version_after="11.1.3", pause_ms=120.5, phase_ms={"total": 3.0},
                        preflight=PreflightReport(vm="a", target="/opt/q",
                                                  mode=CprMode.CPR_EXEC, mode_reason="why",
                                                  checks=(CheckResult(name="c", passed=True,
                                                                      message=""),)))
    return base.model_copy(update=changes)


def test_result_to_pb() -> None:
    msg = convert.result_to_pb(result(), pause_budget_ms=100)
    assert msg.outcome == pb.OUTCOME_UPDATED and msg.mode == pb.MODE_CPR_EXEC
    assert (msg.pid_after, msg.version_after, msg.pause_ms) == (42, "11.1.3", 120.5)
    assert msg.pause_budget_exceeded
    assert msg.preflight.passed and msg.preflight.checks[0].name == "c"
    assert not convert.result_to_pb(result(), pause_budget_ms=0).pause_budget_exceeded
    lost = convert.result_to_pb(result(outcome=Outcome.LOST, pid_after=None,
                                       version_after=None, pause_ms=None, preflight=None))
    assert not lost.HasField("pid_after") and not lost.HasField("pause_ms")
    assert not lost.HasField("version_after") and not lost.HasField("preflight")


def test_phase_durations() -> None:
    events = [ProgressEvent(phase=p, time_ns=t * 1_000_000, message="")
              for p, t in ((Phase.ACCEPTED, 0), (Phase.PREFLIGHT, 800), (Phase.STOPPING, 830),
                           (Phase.RESUMED, 900), (Phase.FINISHED, 905))]
    assert convert.phase_durations(events) == {"accepted": 800.0, "preflight": 30.0,
                                               "stopping": 70.0, "resumed": 5.0,
                                               "total": 905.0}
    assert convert.phase_durations([]) == {}


def test_events_and_records_to_pb() -> None:
    progress = ProgressEvent(phase=Phase.EXECED, time_ns=1_795_000_000_123_456_789, message="m")
    ev = convert.event_to_pb("op-1", 4, progress)
    assert (ev.operation_id, ev.sequence, ev.progress.phase) == ("op-1", 4, pb.PHASE_EXECED)
    assert ev.progress.time.ToNanoseconds() == progress.time_ns
    assert convert.event_to_pb("op-1", 5, result()).HasField("result")

    spec = convert.update_spec(full_request())
    record = OperationRecord(operation_id="op-1", fingerprint=spec.fingerprint(), request=spec,
                             vm=VM, runtime_dir="/run/vmupdate", state=OperationState.RUNNING,
                             created_ns=10**18, events=(progress,))
    running = convert.record_to_pb(record)
    assert running.state == pb.OPERATION_STATE_RUNNING and not running.HasField("result")
    assert not running.HasField("finished_at")
    finished = convert.record_to_pb(record.model_copy(update={
        "state": OperationState.DONE, "result": result(), "finished_ns": 2 * 10**18,
        "resolved_after_restart": True}))
    assert finished.state == pb.OPERATION_STATE_DONE and finished.resolved_after_restart
    assert not finished.result.pause_budget_exceeded  # 120.5 ms within the 250 ms budget
    assert finished.request == convert.spec_to_pb(spec)
    assert (finished.vm_name, finished.qmp_path) == ("a", VM.qmp_path)
    assert finished.finished_at.ToNanoseconds() == 2 * 10**18


def test_timeout_bounds_match_the_agent_configuration() -> None:
    from vmupdate_agent.config import TimeoutsConfig

    def upper(model: type, name: str) -> float:
        return next(m.le for m in model.model_fields[name].metadata if hasattr(m, "le"))

    pairs = {"qmp_command_seconds": "qmp_command_s", "handover_seconds": "handover_s",
             "load_seconds": "load_s", "guard_commit_seconds": "guard_commit_s"}
    for request_field, config_field in pairs.items():
        assert upper(specs.TimeoutsSpec, request_field) == \
            upper(TimeoutsConfig, config_field), request_field
