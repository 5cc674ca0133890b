"""Operation ids: deterministic, accepted by the agent, parseable, attempts counted."""

from __future__ import annotations

import pytest

from vmupdate_operator.operation_ids import (
    AGENT_OPERATION_ID,
    NIL_UUID,
    next_operation_id,
    operation_id,
    parse_operation_id,
    vm_identity,
)

UID = "5f0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"
VM = "6f1d4c2e-8a0b-4f43-9a51-0c2b7d1e9f10"


def test_shape_and_parse() -> None:
    op = operation_id(UID, 12, VM, 3)
    assert op == f"vmu-{UID}-g12-{VM}-a3"
    assert AGENT_OPERATION_ID.fullmatch(op) and len(op) <= 128
    ref = parse_operation_id(op)
    assert ref is not None and (ref.uid, ref.generation, ref.vm, ref.attempt) == (UID, 12, VM, 3)


def test_same_inputs_same_id_any_input_changes_it() -> None:
    base = operation_id(UID, 1, VM)
    assert operation_id(UID, 1, VM) == base
    others = {operation_id(UID.replace("5", "6"), 1, VM), operation_id(UID, 2, VM),
              operation_id(UID, 1, VM.replace("6", "7")), operation_id(UID, 1, VM, 1)}
    assert base not in others and len(others) == 4


def test_odd_parts_are_hashed_into_safe_ones() -> None:
    op = operation_id("weird uid/with spaces", 1, "vm:name")
    assert AGENT_OPERATION_ID.fullmatch(op)
    assert parse_operation_id(op) is not None


@pytest.mark.parametrize("value", [None, "", "someone-else", "vmu-x-gA-y-a0"])
def test_foreign_ids_do_not_parse(value: str | None) -> None:
    assert parse_operation_id(value) is None


def test_vm_identity() -> None:
    assert vm_identity("a", "x", VM.upper()) == VM
    nil_a = vm_identity("a", "x", NIL_UUID)
    assert nil_a == vm_identity("a", "x", None) != vm_identity("b", "x", None)
    assert nil_a.startswith("h") and len(nil_a) == 32


def test_next_attempt() -> None:
    first = next_operation_id(UID, 4, VM, None)
    assert first == operation_id(UID, 4, VM, 0)
    assert next_operation_id(UID, 4, VM, first) == operation_id(UID, 4, VM, 1)
    # Another generation, VMUpdate or VM starts again at 0.
    assert next_operation_id(UID, 5, VM, first) == operation_id(UID, 5, VM, 0)
    other_vm = vm_identity("a", "y", None)
    assert next_operation_id(UID, 4, other_vm, first) == operation_id(UID, 4, other_vm, 0)
    assert next_operation_id(UID, 4, VM, "foreign") == operation_id(UID, 4, VM, 0)


def test_negative_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        operation_id(UID, -1, VM)
