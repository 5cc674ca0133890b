"""The benchmarks' statistics and tables."""

from __future__ import annotations

import math

import pytest

from bench.stats import EMPTY, Summary, markdown_table, paired_ratios, ratio, summarize


def test_summarize_odd_and_even_counts() -> None:
    assert summarize([3.0, 1.0, 2.0]) == Summary(3, 2.0, 1.0, 3.0)
    assert summarize([4.0, 1.0, 2.0, 3.0]) == Summary(4, 2.5, 1.0, 4.0)


def test_summarize_drops_non_finite_values() -> None:
    assert summarize([1.0, math.nan, math.inf, 5.0]) == Summary(2, 3.0, 1.0, 5.0)


def test_summarize_nothing_is_empty_and_prints_a_dash() -> None:
    s = summarize([])
    assert s is EMPTY and s.n == 0 and math.isnan(s.median)
    assert s.cell() == "—"


def test_cell_shows_median_and_range() -> None:
    assert Summary(3, 2.0, 1.0, 3.25).cell() == "2.0 (1.0–3.2)"
    assert Summary(3, 2.0, 1.0, 3.25).cell(2) == "2.00 (1.00–3.25)"


def test_ratio_of_medians_and_its_undefined_cases() -> None:
    assert ratio(summarize([2.0, 4.0, 6.0]), summarize([2.0])) == 2.0
    assert math.isnan(ratio(EMPTY, summarize([1.0])))
    assert math.isnan(ratio(summarize([1.0]), EMPTY))
    assert math.isnan(ratio(summarize([1.0]), summarize([0.0])))


def test_paired_ratios_round_by_round() -> None:
    assert paired_ratios([10.0, 12.0, 30.0], [10.0, 10.0, 20.0]) == Summary(3, 1.2, 1.0, 1.5)
    # a round with a zero divisor is skipped, an unpaired trailing sample ignored
    assert paired_ratios([1.0, 2.0, 3.0], [0.0, 1.0]) == Summary(1, 2.0, 2.0, 2.0)


def test_markdown_table_formats_and_escapes() -> None:
    text = markdown_table(["a", "b|c"], [["x|y", 1.23456], [3, math.nan], ["z", 123.456]])
    assert text.splitlines() == [
        "| a | b\\|c |",
        "| --- | --- |",
        "| x\\|y | 1.23 |",
        "| 3 | — |",
        "| z | 123.5 |",
    ]


def test_markdown_table_rejects_a_ragged_row() -> None:
    with pytest.raises(ValueError, match="1 cells, the table 2 columns"):
        markdown_table(["a", "b"], [["only one"]])
