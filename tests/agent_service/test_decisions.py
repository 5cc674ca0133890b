"""The service's pure decisions: allowed paths, client identities, restart recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmupdate_agent import guard
from vmupdate_agent.authz import identity_allowed, peer_identities
from vmupdate_agent.models import CprMode, Outcome, Phase, ProgressEvent, RequestedMode
from vmupdate_agent.pathpolicy import outside_allowed, resolve_in_root
from vmupdate_agent.recovery import (
    Action,
    Expected,
    QemuFacts,
    RecoveryFacts,
    decide_recovery,
    infer_mode,
    pause_bounds,
)
from vmupdate_operator.agent_client import RetryPolicy, pick_api_version

# --- allowed directories ----------------------------------------------------------------


def test_outside_allowed() -> None:
    allowed = ["/opt/qemu", "/usr/libexec/vmupdate/"]
    assert outside_allowed("/opt/qemu/bin/qemu", allowed) is None
    assert outside_allowed("/usr/libexec/vmupdate/qemu", allowed) is None
    assert outside_allowed("/opt/qemu-evil/qemu", allowed) is not None  # not a prefix match
    why = outside_allowed("/opt/qemu/bin/qemu", allowed, resolved="/tmp/evil")
    assert why is not None and "resolves to /tmp/evil" in why
    assert outside_allowed("/x", []) is not None


def test_resolve_in_root_follows_links_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt/qemu/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/real-qemu").write_text("")
    # An absolute link is absolute inside the VM's root, not on the agent's host.
    os.symlink("/usr/lib/real-qemu", root / "opt/qemu/bin/abs")
    os.symlink("../../../usr/lib/real-qemu", root / "opt/qemu/bin/rel")
    os.symlink("/opt/qemu/bin/abs", root / "opt/qemu/bin/chain")
    os.symlink("loop2", root / "opt/qemu/bin/loop1")
    os.symlink("loop1", root / "opt/qemu/bin/loop2")
    for name in ("abs", "rel", "chain"):
        assert resolve_in_root(root, f"/opt/qemu/bin/{name}") == "/usr/lib/real-qemu"
    assert resolve_in_root(root, "/opt/qemu/bin/missing") == "/opt/qemu/bin/missing"
    with pytest.raises(OSError, match="too many symlinks"):
        resolve_in_root(root, "/opt/qemu/bin/loop1")


# --- client identities --------------------------------------------------------------------


def test_peer_identities_and_allowlist() -> None:
    ctx = {"x509_common_name": [b"some-workload"],
           "x509_subject_alternative_name": [b"spiffe://cluster.local/sa/op", b"op.example"],
           "transport_security_type": [b"ssl"]}
    names = peer_identities(ctx)
    assert names == ["some-workload", "spiffe://cluster.local/sa/op", "op.example"]
    assert identity_allowed(names, ["op.example"])
    assert not identity_allowed(names, ["vmupdate-operator"])
    assert not identity_allowed([], ["vmupdate-operator"])
    assert not identity_allowed(names, [])


def test_client_helpers() -> None:
    assert pick_api_version(["v1", "v2"], ["v1"]) == "v1"
    assert pick_api_version(["v1", "v2"], ["v2", "v1"]) == "v2"
    assert pick_api_version(["v3"], ["v1"]) is None
    delays = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=1.0).delays()
    got = [next(delays) for _ in range(6)]
    assert all(0.1 <= d <= 1.0 for d in got) and max(got) > 0.5


# --- recovery after a restart -------------------------------------------------------------

BEFORE = Expected(pid_before=100, version_before="11.1.3", was_running=True,
                  expected_version="11.1.3")


def qemu(runstate: str = "running", migration: str = "none", pid: int = 100,
         version: str = "11.1.3") -> QemuFacts:
    return QemuFacts(pid=pid, runstate=runstate, migration=migration, version=version,
                     package="1:11.1.3+ds-1")


W, C, RB = guard.PHASE_WATCHING, guard.PHASE_COMMITTED, guard.PHASE_ROLLED_BACK
REBOOT, STATE = CprMode.CPR_REBOOT, "/run/vmupdate/ops/op-1/state"


@pytest.mark.parametrize(("facts", "action", "outcome"), [
    # cpr-exec with the guard: the new QEMU waits paused for the commit.
    (RecoveryFacts(guard_phase=W, vm=qemu("paused", "completed")), Action.COMMIT, None),
    (RecoveryFacts(guard_phase=W, vm=qemu("inmigrate", "active")), Action.WAIT, None),
    (RecoveryFacts(guard_phase=W, vm=None, vm_error="refused"), Action.WAIT, None),
    (RecoveryFacts(guard_phase=W, vm=qemu("paused", "failed")), Action.ABORT, None),
    (RecoveryFacts(guard_phase=W, vm=qemu("paused", "completed", version="9.0.0")),
     Action.ABORT, None),
    # Already running uncommitted: commit, or the guard would roll back over a live guest.
    (RecoveryFacts(guard_phase=W, vm=qemu("running", "completed")), Action.COMMIT, None),
    (RecoveryFacts(guard_phase=W, watcher_gone=True, vm=qemu("paused", "completed")),
     Action.CONT, None),
    (RecoveryFacts(guard_phase=C, vm=qemu("paused", "completed")), Action.CONT, None),
    (RecoveryFacts(guard_phase=C, vm=qemu()), Action.DONE, Outcome.UPDATED),
    (RecoveryFacts(guard_phase=guard.PHASE_ROLLING_BACK, vm=None), Action.WAIT, None),
    (RecoveryFacts(guard_phase=RB, guard_qemu_pid=200, vm=qemu(pid=200)), Action.DONE,
     Outcome.ROLLED_BACK),
    (RecoveryFacts(guard_phase=guard.PHASE_ROLLBACK_FAILED, guard_error="exec failed"),
     Action.DONE, Outcome.LOST),
    # The agent died before QEMU was touched, or while the old QEMU was stopped.
    (RecoveryFacts(vm=qemu()), Action.DONE, Outcome.FAILED),
    (RecoveryFacts(vm=qemu("paused")), Action.CONT, None),
    (RecoveryFacts(vm=qemu("paused", "active")), Action.WAIT, None),
    (RecoveryFacts(vm=qemu("postmigrate", "failed")), Action.CONT, None),
    # cpr-transfer: the target either ran the guest (adopt it) or never did (stop it).
    (RecoveryFacts(vm=qemu("postmigrate", "completed"), transfer_target_pids=(300,),
                   transfer_target=qemu(pid=300)), Action.ADOPT_TRANSFER_TARGET, None),
    (RecoveryFacts(vm=qemu("postmigrate", "completed"), transfer_target_pids=(300,),
                   transfer_target=qemu("paused", "completed", pid=300)),
     Action.KILL_TRANSFER_TARGET, None),
    (RecoveryFacts(vm=qemu(pid=300)), Action.DONE, Outcome.UPDATED),
    # cpr-reboot before the quit: the started QEMU never ran the guest; the old one resumes.
    (RecoveryFacts(mode=REBOOT, saved_state=STATE, vm=qemu("postmigrate", "completed"),
                   transfer_target_pids=(300,), transfer_target=qemu("inmigrate", pid=300)),
     Action.KILL_TRANSFER_TARGET, None),
    (RecoveryFacts(mode=REBOOT, saved_state=STATE, vm=qemu("postmigrate", "completed")),
     Action.CONT, None),
    # cpr-reboot after the quit: the saved state goes to the waiting new QEMU, wherever its
    # socket is; it is never stopped (it is all that can run the VM now).
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE, vm=None,
                   transfer_target_pids=(300,), transfer_target=qemu("inmigrate", pid=300)),
     Action.LOAD_SAVED_STATE, None),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE,
                   vm=qemu("inmigrate", pid=300)), Action.LOAD_SAVED_STATE, None),
    (RecoveryFacts(mode=REBOOT, old_alive=False, vm=qemu("inmigrate", pid=300)),
     Action.DONE, Outcome.LOST),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE, vm=None,
                   transfer_target_pids=(300,)), Action.WAIT, None),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE, vm=None,
                   transfer_target_pids=(300,), transfer_target=qemu("paused", pid=300)),
     Action.WAIT, None),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE,
                   vm=qemu("inmigrate", "active", pid=300)), Action.WAIT, None),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE,
                   vm=qemu("paused", "completed", pid=300)), Action.CONT, None),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE, vm=qemu(pid=300)),
     Action.DONE, Outcome.UPDATED),
    (RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE, vm=None), Action.DONE,
     Outcome.LOST),
])
def test_decide_recovery(facts: RecoveryFacts, action: Action, outcome: Outcome | None) -> None:
    step = decide_recovery(facts, BEFORE)
    assert (step.action, step.outcome) == (action, outcome), step.message
    assert step.message


def test_time_up_never_waits() -> None:
    waiting = [RecoveryFacts(guard_phase=W, vm=qemu("inmigrate", "active")),
               RecoveryFacts(guard_phase=W, vm=None),
               RecoveryFacts(vm=None), RecoveryFacts(vm=qemu("paused", "active")),
               RecoveryFacts(guard_phase=guard.PHASE_ROLLING_BACK),
               RecoveryFacts(vm=qemu("postmigrate"), transfer_target_pids=(3,)),
               RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE,
                             transfer_target_pids=(3,)),
               RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE,
                             transfer_target_pids=(3,), transfer_target=qemu("paused", pid=3))]
    for facts in waiting:
        assert decide_recovery(facts, BEFORE).action == Action.WAIT
        step = decide_recovery(facts, BEFORE, final=True)
        assert step.action != Action.WAIT, facts
    # Not loaded in time: roll back while that is still safe.
    late = decide_recovery(waiting[0], BEFORE, final=True)
    assert late.action == Action.ABORT


def test_a_paused_vm_is_left_paused_when_it_was_paused() -> None:
    was_paused = Expected(pid_before=100, version_before="11.1.3", was_running=False)
    step = decide_recovery(RecoveryFacts(vm=qemu("paused")), was_paused)
    assert step.action == Action.DONE


def test_infer_mode() -> None:
    assert infer_mode(RequestedMode.AUTO, frozenset({"guard.status", "state"})) == \
        CprMode.CPR_EXEC
    assert infer_mode(RequestedMode.AUTO, frozenset({"new-qemu.log"})) == CprMode.CPR_TRANSFER
    assert infer_mode(RequestedMode.CPR_REBOOT, frozenset()) == CprMode.CPR_REBOOT
    assert infer_mode(RequestedMode.AUTO, frozenset()) is None
    # A cpr-reboot leaves a new-qemu.log too: the request says which mode it was.
    assert infer_mode(RequestedMode.CPR_REBOOT, frozenset({"new-qemu.log", "state"})) == \
        CprMode.CPR_REBOOT


def test_a_lost_reboot_says_how_to_bring_the_vm_back() -> None:
    step = decide_recovery(RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE),
                           BEFORE)
    assert step.outcome == Outcome.LOST
    assert f"migrate-incoming file:{STATE}" in step.message and "-incoming defer" in step.message
    timed_out = decide_recovery(RecoveryFacts(mode=REBOOT, old_alive=False, saved_state=STATE,
                                              transfer_target_pids=(300,)), BEFORE, final=True)
    assert timed_out.outcome == Outcome.LOST and "never answered" in timed_out.message


def test_a_restarted_agent_waits_while_the_keeper_acts() -> None:
    acting = RecoveryFacts(keeper_acting=True, vm=qemu("postmigrate", "completed"))
    assert decide_recovery(acting, BEFORE).action == Action.WAIT
    # Time up: the keeper is not waited for any more; the ordinary rules apply.
    assert decide_recovery(acting, BEFORE, final=True).action == Action.CONT


def _event(phase: Phase, t: int, stopped: int | None = None) -> ProgressEvent:
    return ProgressEvent(phase=phase, time_ns=t, message="m", guest_stopped_ns=stopped)


def test_pause_bounds_of_an_interrupted_operation() -> None:
    stopping = _event(Phase.STOPPING, 100)
    execed = _event(Phase.EXECED, 200, stopped=150)
    # Nothing journaled the STOP and no guard started: no pause is claimed.
    assert pause_bounds([stopping], RecoveryFacts(resumed_ns=900), [950]) == (None, None)
    # The guard's start bounds the STOP when the agent died before journaling it.
    assert pause_bounds([stopping], RecoveryFacts(guard_started_ns=160, resumed_ns=400),
                        []) == (160, 400)
    # The journaled STOP wins; then the agent's own RESUMED, the watcher's or keeper's resume,
    # then the recovery's own cont.
    resumed = _event(Phase.RESUMED, 300, stopped=150)
    assert pause_bounds([stopping, execed, resumed], RecoveryFacts(resumed_ns=500), [600]
                        ) == (150, 300)
    assert pause_bounds([stopping, execed], RecoveryFacts(resumed_ns=500), [600]) == (150, 500)
    assert pause_bounds([stopping, execed], RecoveryFacts(), [600]) == (150, 600)
    assert pause_bounds([stopping, execed], RecoveryFacts(), []) == (150, None)
    # A resume from before the STOP is not this pause's end.
    assert pause_bounds([stopping, execed], RecoveryFacts(resumed_ns=120), []) == (150, None)
