"""`vmupdate-agent` refuses bad input before it looks at any VM: exit 2, a message naming the
flag and what is wrong. (Running updates through the CLI: tests/agent_service.)"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from vmupdate_agent import cli


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was done, nothing to show
    return rc, captured.err


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    return ["--allowed-dir", "/opt/qemu/bin", "--runtime-dir", str(tmp_path / "rt"),
            "--state-dir", str(tmp_path / "state")]


UPDATE = ["update", "/run/vms/vm1/qmp.sock", "--binary", "/opt/qemu/bin/qemu"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--op-id", "../x"], "--op-id '../x' is not 1-128 characters of [A-Za-z0-9._-]"),
    (["--op-id", "x" * 129], "--op-id"),
    (["--sha256", "abc"], "--sha256 must be 64 hexadecimal digits"),
    (["--extra-arg=-qmp"], "--extra-arg"),
    (["--version", "1\n2"], "--version contains control characters"),
])
def test_bad_update_flags_name_the_flag(capsys: pytest.CaptureFixture[str], dirs: list[str],
                                        tmp_path: Path, extra: list[str], expected: str
                                        ) -> None:
    rc, err = run(capsys, *dirs, *UPDATE, *extra)
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "state").exists()  # refused before the journal was touched


def test_a_relative_binary_or_dir_is_refused(capsys: pytest.CaptureFixture[str],
                                              dirs: list[str]) -> None:
    rc, err = run(capsys, *dirs, "--socket-glob", "/run/vms/*/qmp.sock", "update", "vm1",
                  "--binary", "qemu")
    assert rc == 2 and "--binary must be an absolute path, got 'qemu'" in err
    rc, err = run(capsys, "--state-dir", "state", *UPDATE)
    assert rc == 2 and "--state-dir must be absolute, got 'state'" in err


def test_the_configuration_the_flags_make_is_checked(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    base = ["--runtime-dir", str(tmp_path / "rt"), "--state-dir", str(tmp_path / "state")]
    rc, err = run(capsys, *base, *UPDATE)
    assert rc == 2 and "--allowed-dir:" in err and "at least 1" in err
    rc, err = run(capsys, *base, "--allowed-dir", "/", *UPDATE)
    assert rc == 2 and "--allowed-dir: Value error, allowed_binary_dirs[] '/' would allow" in err
    rc, err = run(capsys, *base, "--allowed-dir", "/opt/qemu/bin", "update", "vm1",
                  "--binary", "/opt/qemu/bin/qemu")
    assert rc == 2 and "no QMP socket globs to find the VM" in err
    long_rt = "/" + "r" * 100
    rc, err = run(capsys, "--state-dir", str(tmp_path / "s"), "--runtime-dir", long_rt,
                  "--allowed-dir", "/opt/qemu/bin", *UPDATE)
    assert rc == 2 and "--runtime-dir:" in err
    assert not (tmp_path / "state").exists() and not (tmp_path / "s").exists()


def test_refusals_map_to_exit_codes() -> None:
    assert cli.REFUSED_EXIT[grpc.StatusCode.FAILED_PRECONDITION] == cli.EXIT_BUSY == 5
    assert cli.REFUSED_EXIT.get(grpc.StatusCode.PERMISSION_DENIED, 1) == 1
    assert cli.REFUSED_EXIT[grpc.StatusCode.NOT_FOUND] == 2
    assert set(cli.EXIT.values()) | {cli.EXIT_BUSY} == {0, 1, 3, 4, 5}
