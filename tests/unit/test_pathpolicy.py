"""The one rule on where a target QEMU may come from (vmupdate_agent.pathpolicy): pure parts
exhaustively, and the whole rule on real files in a directory standing in for a VM's root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmupdate_agent import pathpolicy


@pytest.mark.parametrize(("directory", "problem"), [
    ("/", "'/' would allow every binary"),
    ("//", "'/' would allow every binary"),
    ("/.", "'/' would allow every binary"),
    ("opt/qemu", "must be an absolute path"),
    ("/opt/../", "must not contain '..'"),
    ("/opt/qemu/bin", None),
    ("/opt/qemu/bin/", None),
])
def test_allowed_dir_problem(directory: str, problem: str | None) -> None:
    got = pathpolicy.allowed_dir_problem(directory)
    assert (got is None) == (problem is None) and (problem is None or problem in (got or ""))


@pytest.mark.parametrize(("path", "dirs", "inside"), [
    ("/opt/qemu/bin/qemu", ("/opt/qemu/bin",), True),
    ("/opt/qemu/bin/qemu", ("/opt/qemu/bin/",), True),
    ("/opt/qemu/binx/qemu", ("/opt/qemu/bin",), False),
    ("/opt/qemu/bin/../../../bin/sh", ("/opt/qemu/bin",), False),
    ("/bin/sh", ("/",), False),  # '/' allows nothing
    ("/bin/sh", ("/", "/opt"), False),
    ("bin/sh", ("/bin",), False),
    ("/opt/qemu/bin", ("/opt/qemu/bin",), True),
])
def test_lexically_under(path: str, dirs: tuple[str, ...], inside: bool) -> None:
    assert pathpolicy.lexically_under(path, dirs) is inside


@pytest.mark.parametrize(("mode", "refused"), [
    (0o100755, False), (0o100775, True), (0o100757, True), (0o040755, False),
    (0o040775, True), (0o041777, True), (0o040700, False), (0o100700, False),
])
def test_writable_problem(mode: int, refused: bool) -> None:
    why = pathpolicy.writable_problem("/x", mode)
    assert (why is not None) is refused
    if why:
        assert why.startswith("target.binary: the ") and "chmod go-w /x" in why


def make_root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "vmroot"
    bindir = root / "opt" / "qemu" / "bin"
    bindir.mkdir(parents=True)
    for d in (root, root / "opt", root / "opt" / "qemu", bindir):
        d.chmod(0o755)
    binary = bindir / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root, binary


def test_a_clean_target_passes(tmp_path: Path) -> None:
    root, _ = make_root(tmp_path)
    assert pathpolicy.check(root, "/opt/qemu/bin/qemu-system-x86_64", ("/opt/qemu/bin",)) is None


@pytest.mark.parametrize("writable", ["/", "/opt", "/opt/qemu", "/opt/qemu/bin",
                                      "/opt/qemu/bin/qemu-system-x86_64"])
@pytest.mark.parametrize("bits", [0o020, 0o002])
def test_a_writable_file_or_directory_on_the_way_is_refused(tmp_path: Path, writable: str,
                                                            bits: int) -> None:
    root, _ = make_root(tmp_path)
    target = root / writable.lstrip("/") if writable != "/" else root
    target.chmod(target.stat().st_mode & 0o777 | bits)
    why = pathpolicy.check(root, "/opt/qemu/bin/qemu-system-x86_64", ("/opt/qemu/bin",))
    assert why is not None and f" {writable} is writable by" in why, why


def test_a_symlink_leading_out_of_the_allowed_dirs_is_refused(tmp_path: Path) -> None:
    root, _ = make_root(tmp_path)
    (root / "bin").mkdir(mode=0o755)
    (root / "bin" / "sh").write_text("")
    os.symlink("/bin/sh", root / "opt" / "qemu" / "bin" / "evil")
    why = pathpolicy.check(root, "/opt/qemu/bin/evil", ("/opt/qemu/bin",))
    assert why is not None and "resolves to /bin/sh, outside" in why


def test_an_absolute_symlink_stays_inside_the_vm_root(tmp_path: Path) -> None:
    """Resolved inside the VM's root: '/opt/...' in a link means the root's /opt, not the
    agent's."""
    root, _ = make_root(tmp_path)
    os.symlink("/opt/qemu/bin/qemu-system-x86_64", root / "opt" / "qemu" / "bin" / "current")
    assert pathpolicy.resolve_in_root(root, "/opt/qemu/bin/current") == \
        "/opt/qemu/bin/qemu-system-x86_64"
    assert pathpolicy.check(root, "/opt/qemu/bin/current", ("/opt/qemu/bin",)) is None


def test_root_as_allowed_dir_refuses_everything(tmp_path: Path) -> None:
    root, _ = make_root(tmp_path)
    why = pathpolicy.check(root, "/opt/qemu/bin/qemu-system-x86_64", ("/",))
    assert why is not None and "outside the directories this host allows" in why


def test_lexical_check_only_before_the_vm_is_known() -> None:
    assert pathpolicy.check(None, "/opt/qemu/bin/q", ("/opt/qemu/bin",)) is None
    assert "outside" in (pathpolicy.check(None, "/usr/bin/q", ("/opt/qemu/bin",)) or "")
