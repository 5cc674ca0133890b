"""The loop's row bookkeeping: a task's news replaces exactly its row, wherever it is."""

from __future__ import annotations

import random

from tests.operator.builders import row
from vmupdate_api.crd_models import VMPhase
from vmupdate_operator.planning import key_of
from vmupdate_operator.rollout import _replaced


def test_changed_rows_are_replaced_in_place_on_random_sorted_rows() -> None:
    rng = random.Random(7)
    for _ in range(50):
        rows = sorted({key_of(r): r for r in (row(f"h{rng.randrange(9)}", f"vm{rng.randrange(30)}")
                                              for _ in range(rng.randint(1, 60)))}.values(),
                      key=key_of)
        by_key = {key_of(r): r for r in rows}
        changed = set(rng.sample(sorted(by_key), rng.randint(0, len(rows))))
        for key in changed:
            by_key[key] = by_key[key].model_copy(update={"phase": VMPhase.UPDATED})
        out = _replaced(rows, by_key, changed)
        assert out == [by_key[key_of(r)] for r in rows]
        assert all(a is b for a, b in zip(out, rows, strict=True) if key_of(a) not in changed)
        assert [r.phase for r in rows] == [VMPhase.PENDING] * len(rows)  # not changed


def test_duplicate_or_unsorted_rows_are_all_taken_from_the_map() -> None:
    a, b, c = row("h1", "x"), row("h1", "y"), row("h2", "x")
    new_a = a.model_copy(update={"phase": VMPhase.UPDATED})
    # Records read at start may hold a VM twice: every copy takes the new row.
    assert _replaced([a, a, b], {key_of(a): new_a, key_of(b): b}, {key_of(a)}) == [new_a,
                                                                                  new_a, b]
    unsorted = [c, b, a]
    by_key = {key_of(c): c, key_of(b): b, key_of(a): new_a}
    assert _replaced(unsorted, by_key, {key_of(a)}) == [c, b, new_a]
