"""The mode choice: every request, preference and pair of QEMUs against the rule written out
on its own, and the reason given for each kind of choice."""

from __future__ import annotations

import itertools

import pytest

from tests.unit.qemu_features import (
    ALL_MODES,
    EXEC,
    F10,
    F11,
    REBOOT,
    TRANSFER,
    V7,
    V9_2,
    V10,
    V11,
    features,
)
from vmupdate_agent.modechoice import choose_mode
from vmupdate_agent.models import CprMode, Preference, QemuFeatures, RequestedMode

C = pytest.param

MODE_SETS = [tuple(m for m in ALL_MODES if m in combo)
             for n in range(4) for combo in itertools.combinations(ALL_MODES, n)]


def expected_mode(requested: RequestedMode, old: QemuFeatures, new: QemuFeatures | None,
                  prefer: Preference = Preference.SAME_PID) -> CprMode | None:
    """The rule, written out independently of the implementation."""
    if requested != RequestedMode.AUTO:
        mode = CprMode(requested.value)
        supported = mode in old.cpr_modes and (new is None or mode in new.cpr_modes)
        return mode if supported else None
    if new is None:
        return None
    possible = []
    if EXEC in old.cpr_modes and EXEC in new.cpr_modes and old.has_cpr_exec_command:
        possible.append(EXEC)
    if TRANSFER in old.cpr_modes and TRANSFER in new.cpr_modes:
        possible.append(TRANSFER)
    first = {Preference.SAME_PID: EXEC, Preference.SHORTEST_PAUSE: TRANSFER}[prefer]
    if first in possible:
        return first
    return possible[0] if possible else None


def test_choose_mode_exhaustively() -> None:
    """Every request x preference x the running QEMU's modes and cpr-exec-command x the
    target's (or none, unprobed)."""
    olds = [features(V11, modes, cmd=cmd) for modes in MODE_SETS for cmd in (False, True)]
    news: list[QemuFeatures | None] = [None, *(features(V10, modes, cmd=cmd)
                                               for modes in MODE_SETS for cmd in (False, True))]
    seen = 0
    for requested, prefer, old, new in itertools.product(RequestedMode, Preference, olds, news):
        mode, why = choose_mode(requested, old, new, prefer)
        assert mode == expected_mode(requested, old, new, prefer), (requested, old, new, why)
        assert why
        if requested == RequestedMode.AUTO:
            assert why.startswith("Auto")
            # The reason names the preference whenever it decided, or was overruled.
            if mode is not None and prefer == Preference.SHORTEST_PAUSE:
                assert "shortest pause was preferred" in why, why
            if mode == TRANSFER and prefer == Preference.SAME_PID:
                assert "same pid cannot be kept" in why, why
        else:
            assert str(requested) in why
            # A named mode ignores the preference.
            assert (mode, why) == choose_mode(requested, old, new)
        seen += 1
    assert seen == 4 * 2 * 16 * 17


def test_choose_mode_defaults_to_the_same_pid() -> None:
    assert choose_mode(RequestedMode.AUTO, F11, F11)[0] == EXEC
    assert choose_mode(RequestedMode.AUTO, F11, F11, Preference.SAME_PID)[0] == EXEC


@pytest.mark.parametrize(("old", "new", "mode", "needles"), [
    C(F11, F11, TRANSFER, ("Auto chose cpr-transfer: the shortest pause was preferred",
                           "the VM gets a new pid", "both support cpr-transfer"), id="both"),
    C(features(V11, (EXEC,)), F11, EXEC,
      ("Auto chose cpr-exec", "the shortest pause was preferred but cpr-transfer is not "
       "supported by both"), id="old-lacks-transfer"),
    C(F11, features(V11, (EXEC, REBOOT)), EXEC, ("cpr-transfer is not supported by both",),
      id="new-lacks-transfer"),
    C(F10, F11, TRANSFER, ("the shortest pause was preferred",), id="old-10.0"),
    C(features(V9_2, (REBOOT,), cmd=False), F11, None,
      ("Auto found no CPR mode both QEMUs support",), id="never-reboot"),
    C(F11, None, None, ("the new binary could not be probed",), id="unprobed"),
])
def test_auto_with_shortest_pause(old: QemuFeatures, new: QemuFeatures | None,
                                  mode: CprMode | None, needles: tuple[str, ...]) -> None:
    got, why = choose_mode(RequestedMode.AUTO, old, new, Preference.SHORTEST_PAUSE)
    assert got == mode, why
    for needle in needles:
        assert needle in why


@pytest.mark.parametrize(("requested", "old", "new", "mode", "needles"), [
    C(RequestedMode.AUTO, F11, F11, EXEC,
      ("Auto chose cpr-exec: both QEMUs support cpr-exec",), id="auto-exec"),
    C(RequestedMode.AUTO, F11, features(cmd=False), EXEC, ("Auto chose cpr-exec",),
      id="auto-exec-only-old-needs-the-command"),
    C(RequestedMode.AUTO, F11, F10, TRANSFER,
      ("Auto chose cpr-transfer", "running 11.1.3, target 10.0.2", "both support cpr-transfer"),
      id="auto-transfer-new-10.0"),
    C(RequestedMode.AUTO, F10, F11, TRANSFER,
      ("Auto chose cpr-transfer", "cpr-exec needs QEMU >= 10.2 on both sides",
       "running 10.0.2, target 11.1.3"), id="auto-transfer-old-10.0"),
    C(RequestedMode.AUTO, F10, F10, TRANSFER, ("running 10.0.2, target 10.0.2",),
      id="auto-transfer-both-10.0"),
    C(RequestedMode.AUTO, F11, None, None,
      ("Auto cannot choose a mode: the new binary could not be probed",), id="auto-unprobed"),
    C(RequestedMode.AUTO, features(V9_2, (REBOOT,), cmd=False), F11, None,
      ("Auto found no CPR mode both QEMUs support", "running 9.2.0: cpr-reboot",
       "target 11.1.3: cpr-reboot, cpr-transfer, cpr-exec", "QEMU >= 10.0 is needed on both"),
      id="auto-never-picks-reboot"),
    C(RequestedMode.AUTO, features(V7, ()), F11, None, ("running 7.2.0: none",),
      id="auto-old-without-cpr"),
    C(RequestedMode.AUTO, F11, features(V7, ()), None, ("target 7.2.0: none",),
      id="auto-new-without-cpr"),
    C(RequestedMode.CPR_EXEC, F11, F11, EXEC, ("cpr-exec was requested",), id="exec"),
    C(RequestedMode.CPR_EXEC, F11, None, EXEC,
      ("cpr-exec was requested (the new binary could not be probed)",), id="exec-unprobed"),
    C(RequestedMode.CPR_EXEC, F10, F11, None,
      ("cpr-exec was requested but the running QEMU 10.0.2 does not support it",
       "ask for Auto or a mode both support"), id="exec-old-lacks"),
    C(RequestedMode.CPR_EXEC, F11, F10, None,
      ("cpr-exec was requested but the target QEMU 10.0.2 does not support it",),
      id="exec-new-lacks"),
    C(RequestedMode.CPR_EXEC, F10, F10, None,
      ("the running QEMU 10.0.2 and the target QEMU 10.0.2",), id="exec-both-lack"),
    C(RequestedMode.CPR_EXEC, F10, None, None, ("the running QEMU 10.0.2",),
      id="exec-old-lacks-new-unprobed"),
    C(RequestedMode.CPR_TRANSFER, F10, F11, TRANSFER, ("cpr-transfer was requested",),
      id="transfer"),
    C(RequestedMode.CPR_TRANSFER, features(V9_2, (REBOOT,)), F11, None,
      ("the running QEMU 9.2.0 does not support it",), id="transfer-old-lacks"),
    C(RequestedMode.CPR_REBOOT, F11, F10, REBOOT, ("cpr-reboot was requested",), id="reboot"),
    C(RequestedMode.CPR_REBOOT, F11, features(V11, (EXEC, TRANSFER)), None,
      ("the target QEMU 11.1.3 does not support it",), id="reboot-new-lacks"),
])
def test_choose_mode(requested: RequestedMode, old: QemuFeatures, new: QemuFeatures | None,
                     mode: CprMode | None, needles: tuple[str, ...]) -> None:
    got, why = choose_mode(requested, old, new)
    assert got == mode
    for needle in needles:
        assert needle in why


def test_auto_names_the_missing_cpr_exec_command_when_that_is_why() -> None:
    # Both are 11.1.3 and list cpr-exec; only the running one's cpr-exec-command parameter is
    # missing. "cpr-exec needs QEMU >= 10.2 on both sides" would send the operator after a
    # version they already have.
    mode, why = choose_mode(RequestedMode.AUTO, features(cmd=False), F11)
    assert mode == TRANSFER
    assert "cpr-exec-command" in why
    assert ">= 10.2" not in why
