"""The pause benchmark's tables, records and plots, from hand-made records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import plots, records, report
from bench.__main__ import (
    fleet_plan,
    fleet_replay,
    main,
    parser,
    write_fleet_outputs,
    write_pause_outputs,
)
from bench.pause import plan_cases
from bench.simagent import Replay
from tests.bench import sample

PNG = b"\x89PNG\r\n\x1a\n"


def test_pause_table_rows_per_method_columns_per_size() -> None:
    lines = report.pause_table(sample.results()).splitlines()
    assert lines[0] == "| ms, median (min–max) | 256 MiB | 1 GiB |"
    assert "| cpr-exec (memfd) pause | 55.0 (50.0–60.0) | 52.0 (52.0–52.0) |" in lines
    assert "| cpr-reboot (file) pause | 95.0 (90.0–100.0) | — |" in lines
    assert "| plain (memfd) pause | 16.0 (15.0–17.0) | 18.0 (18.0–18.0) |" in lines
    assert "| plain (memfd) total | 1100.0 (1000.0–1200.0) | 4000.0 (4000.0–4000.0) |" in lines


def test_overhead_is_agent_over_handmade_for_cpr_cases_only() -> None:
    rows = report.overhead_rows(sample.results())
    assert [o["case"] for o in rows] == ["cpr-exec (memfd) 256 MiB", "cpr-exec (memfd) 1 GiB",
                                         "cpr-reboot (file) 256 MiB"]
    assert rows[0]["ratio"] == pytest.approx(1.1)
    assert rows[0]["paired"].median == pytest.approx(1.1)
    assert rows[2]["paired"].min == pytest.approx(1.0)
    assert rows[2]["paired"].max == pytest.approx(1.125)
    assert "| cpr-exec (memfd) 256 MiB | 55.0 (50.0–60.0) | 50.0 (50.0–50.0) | 1.10 |" in (
        report.overhead_table(sample.results()))


def test_per_mode_every_case_is_pooled() -> None:
    rows = report.mode_rows(sample.results())
    assert [o["mode"] for o in rows] == ["cpr-exec", "cpr-reboot"]  # plain has no agent
    exec_row = rows[0]
    # agent 50, 60, 55, 52 against hand-made 50, 50, 50, 49: medians 53.5 and 50
    assert exec_row["agent"].n == 4 and exec_row["ratio"] == pytest.approx(53.5 / 50)
    assert exec_row["paired"].median == pytest.approx((1.1 + 52 / 49) / 2)
    assert exec_row["cases_within"] == 0 and exec_row["cases"] == 2  # 1.10 and 1.06
    reboot = rows[1]
    assert reboot["ratio"] == pytest.approx(95 / 90) and reboot["cases_within"] == 0
    lines = report.mode_table(sample.results()).splitlines()
    assert lines[2] == ("| cpr-exec | 4 | 53.5 (50.0–60.0) | 50.0 (49.0–50.0) | 1.07 | "
                        "1.08 (1.00–1.20) | 0 of 2 |")
    # a case within the bound is counted
    results = sample.results()
    results[1]["series"]["agent_pause_ms"] = [49.0]
    assert report.mode_rows(results)[0]["cases_within"] == 1


def test_cpr_exec_without_the_guard_is_set_beside_the_agent() -> None:
    results = sample.results()
    results[0]["series"]["agent_unguarded_pause_ms"] = [51.0, 52.0, 53.0]
    rows = report.overhead_rows(results)
    assert rows[0]["unguarded"].median == 52.0
    assert rows[0]["unguarded_ratio"] == pytest.approx(1.04)
    # Not measured (other modes, older records): a dash, not a zero.
    assert rows[1]["unguarded"].n == 0 and math.isnan(rows[1]["unguarded_ratio"])
    table = report.overhead_table(results).splitlines()
    assert table[2].endswith("| 52.0 (51.0–53.0) | 1.04 |")
    assert table[4].endswith("| — | — |")


def test_phases_in_the_agents_order_then_unknown_ones() -> None:
    phases = report.phase_summaries([{"total": 9.0, "zeta": 1.0, "stopping": 2.0},
                                     {"stopping": 4.0, "start": 1.0}])
    assert list(phases) == ["start", "stopping", "total", "zeta"]
    assert phases["stopping"].median == 3.0 and phases["start"].n == 1


def test_breakdown_says_what_the_agent_adds_over_the_handmade_pause() -> None:
    table = report.breakdown_table(sample.results())
    row = next(line for line in table.splitlines() if "cpr-exec (memfd) 256 MiB" in line)
    assert "start 10.0; stopping 21.0; execed 30.0; saved 5.0; total 71.0" in row
    assert "21.0 (20.0–22.0)" in row  # the floor
    assert row.endswith("| 5.00 |")  # 55 - 50
    assert "plain" not in table


def test_record_round_trips_and_rejects_what_reports_cannot_read(tmp_path: Path) -> None:
    doc = sample.document()
    records.write_json(tmp_path / "r" / "pause.json", doc)
    assert records.read_json(tmp_path / "r" / "pause.json") == doc
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["pause.json"]  # no temp left
    for broken, why in (([], "JSON object"), ({**doc, "results": {}}, "'results'"),
                        ({**doc, "schema": 99}, "schema 99")):
        with pytest.raises(ValueError, match=why):
            records.check_document(broken)


def test_a_record_never_holds_nan(tmp_path: Path) -> None:
    doc = sample.document()
    doc["results"][0]["series"]["agent_pause_ms"].append(math.nan)
    with pytest.raises(ValueError):
        records.write_json(tmp_path / "x.json", doc)


def test_accelerator_from_query_kvm() -> None:
    assert records.accelerator({"enabled": False, "present": True}) == "TCG"
    assert records.accelerator({"enabled": True, "present": True}) == "KVM"


def test_machine_names_no_host_or_path() -> None:
    m = records.machine()
    assert set(m) == {"cpu", "cpus", "mem_total_mib", "kernel", "python", "loadavg",
                      "niceness"}
    assert not any("/" in str(v) for v in m.values())


def test_outputs_tables_json_and_pngs(tmp_path: Path) -> None:
    text = write_pause_outputs(sample.document(), tmp_path)
    assert "Test CPU ×2" in text and "accelerator TCG" in text
    assert (tmp_path / "pause.md").read_text() == text
    assert json.loads((tmp_path / "pause.json").read_text())["benchmark"] == "pause"
    for name in ("pause-vs-ram.png", "agent-vs-handmade.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_plots_cope_with_a_single_case(tmp_path: Path) -> None:
    one = sample.results()[:1]
    assert plots.pause_vs_ram(one, tmp_path / "a.png", "t").read_bytes()[:8] == PNG
    assert plots.agent_vs_handmade(one, tmp_path / "b.png", "t").read_bytes()[:8] == PNG


def test_cases_skip_cpr_reboot_on_memfd() -> None:
    cases = plan_cases(["cpr-exec", "cpr-reboot", "plain"], ["memfd", "file"], [256, 1024])
    assert len(cases) == 10
    assert [c.name for c in cases[:5]] == [
        "cpr-exec/memfd/256M", "cpr-exec/file/256M", "cpr-reboot/file/256M",
        "plain/memfd/256M", "plain/file/256M"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--sizes", "256,x"], "not a comma-separated list"),
    (["--sizes", "32"], "between 64 and"),
    (["--methods", "cpr-exec,live"], "live not among"),
    (["--backends", ""], "empty not among"),
])
def test_bad_arguments_name_the_option(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--out", "x", *argv])
    assert message in capsys.readouterr().err


def test_defaults_are_the_full_measurement() -> None:
    args = parser().parse_args(["--out", "x"])
    assert args.sizes == [256, 1024, 4096, 8192] and args.rounds == 10
    assert args.methods == ["cpr-exec", "cpr-transfer", "cpr-reboot", "plain"]
    assert args.backends == ["memfd", "file"]


def test_titles_name_accelerator_load_and_rounds() -> None:
    doc = sample.document()
    assert report.short_title(doc) == "TCG, 2 CPUs, load 1.0, 3 rounds, 2026-01-02"
    assert "load average at start 1.0/1.0/1.0" in report.environment_lines(doc)


def test_from_json_redraws_without_measuring(tmp_path: Path) -> None:
    records.write_json(tmp_path / "in.json", sample.document())
    assert main(["--out", str(tmp_path / "out"), "--from-json", str(tmp_path / "in.json")]) == 0
    assert (tmp_path / "out" / "pause-vs-ram.png").read_bytes()[:8] == PNG


def test_from_json_refuses_a_broken_record(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.json").write_text('{"schema": 1}')
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--from-json", str(tmp_path / "in.json")])
    err = capsys.readouterr().err
    assert "--from-json" in err and "'benchmark' missing" in err


def test_fleet_replays_cpr_exec_on_memfd_at_the_smallest_size() -> None:
    replay = fleet_replay(sample.document())
    assert replay.mode == "cpr-exec" and replay.pause_ms == 55.0  # the 256 MiB case
    assert fleet_replay(None) == Replay()
    doc = sample.document()
    doc["results"] = [r for r in doc["results"] if r["method"] != "cpr-exec"]
    assert fleet_replay(doc) == Replay()


@pytest.mark.parametrize(("argv", "message"), [
    (["--fleet-parallel", "0"], "from 1 to 1000"),
    (["--fleet-parallel", "10,1001"], "from 1 to 1000"),
    (["--fleet-parallel", "x"], "from 1 to 1000"),
    (["--only", "fleet", "--fleet-hosts", "0"], "--fleet-hosts"),
])
def test_bad_fleet_arguments_name_the_option(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--out", "x", *argv])
    assert message in capsys.readouterr().err


def test_fleet_outputs(tmp_path: Path) -> None:
    record = {"hosts": 2, "vms": 4, "parallel": 2, "per_host": 1, "per_vm_ms": 150.0,
              "phase": "Failed", "total_ms": 900.0, "ideal_ms": 1.0,
              "api": {"operator": {"requests": 8, "write_bytes": 4096}},
              "operator_cpu_s": 1.0, "operator_peak_rss_mib": 100.0, "etcd_db_bytes": 2**20,
              "vmupdate_bytes": 2048, "failure_to_halt_ms": 1500.0}
    doc = records.document("fleet", {"hosts": 2}, sample.document()["environment"], [record],
                           started=records.now(), finished=records.now())
    text = write_fleet_outputs(doc, tmp_path)
    assert "Test CPU ×2" in text and "QEMU" not in text
    assert "| 2 × 2 | 2 | Failed | 0.90 | 0.30 | 3.00 | 2.00 | 1.00 |" in text
    assert text.rstrip().endswith("| 1.50 | — | — | — |")  # halt 1.5 s; no CPU, no load recorded
    assert records.read_json(tmp_path / "fleet.json")["results"] == [
        {**record, "ideal_ms": 300.0}]  # recomputed from the record's fields
    assert main(["--out", str(tmp_path / "again"), "--from-json",
                 str(tmp_path / "fleet.json")]) == 0
    assert (tmp_path / "again" / "fleet.md").read_text() == text
    assert (tmp_path / "fleet-vs-ideal.png").read_bytes()[:8] == PNG


def test_the_fleet_plan_by_default_and_by_flags() -> None:
    def plan(*flags: str) -> list[tuple[int, int, int]]:
        return fleet_plan(parser().parse_args(["--out", "x", *flags]))

    # One command: a fleet per parallelism, the largest at 1,000 x 20.
    assert plan() == [(1, 10, 3), (10, 50, 10), (100, 200, 10), (1000, 1000, 20)]
    assert plan("--fleet-plan", "1:2x3") == [(1, 2, 3)]
    assert plan("--fleet-hosts", "5") == [(n, 5, 20) for n in (1, 10, 100, 1000)]
    assert plan("--fleet-parallel", "1,10") == [(1, 1000, 20), (10, 1000, 20)]


def test_a_plan_and_the_fleet_flags_together_are_refused(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    with pytest.raises(SystemExit):
        main(["--out", "x", "--fleet-plan", "1:2x3", "--fleet-hosts", "5"])
    assert "not both" in capsys.readouterr().err
