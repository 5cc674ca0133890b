"""Per-operation work folders: every UNIX socket an update creates fits, whatever the ids.

The sockets are really bound at the longest paths, so the limit is the kernel's, not ours.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vmupdate_agent import workdirs
from vmupdate_agent.config import AgentConfig, ConfigError, load
from vmupdate_agent.specs import OPERATION_ID
from vmupdate_operator.operation_ids import operation_id

LONGEST_ID = "v" + "x" * 127
MINIMAL: dict[str, Any] = {"socket_globs": ["/run/vms/*/qmp.sock"],
                           "allowed_binary_dirs": ["/usr/lib/qemu-new"]}


def long_dir(base: Path, length: int) -> Path:
    """A folder under ``base`` whose path is exactly ``length`` bytes long."""
    room = length - len(str(base)) - 1
    assert room >= 1, f"{base} is too long for a {length}-byte path"
    parts = []
    while room > 0:
        take = min(room, 50)
        if room - take == 1:  # leave room for a one-character part after its "/"
            take -= 1
        parts.append("d" * take)
        room -= take + 1
    path = base.joinpath(*parts)
    assert len(str(path)) == length
    path.mkdir(parents=True)
    return path


def bind(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
    os.unlink(path)


def test_the_longest_ids_fit_under_the_longest_runtime_dir(tmp_path: Path) -> None:
    assert OPERATION_ID.fullmatch(LONGEST_ID)
    runtime = str(long_dir(tmp_path, workdirs.MAX_RUNTIME_DIR))
    assert workdirs.check_runtime_dir(runtime) == runtime
    work = workdirs.workdir(runtime, LONGEST_ID)
    os.makedirs(work)
    for name in workdirs.WORKDIR_SOCKETS:
        path = os.path.join(work, name)
        assert len(path.encode()) <= workdirs.MAX_SOCKET_PATH
        bind(path)
    for name in workdirs.RUNTIME_SOCKETS:
        bind(os.path.join(runtime, name))
    # The longest of them is exactly at the limit: MAX_RUNTIME_DIR is not conservative.
    assert len(os.path.join(work, "main.sock").encode()) == workdirs.MAX_SOCKET_PATH


def test_one_byte_more_does_not_bind(tmp_path: Path) -> None:
    runtime = str(long_dir(tmp_path, workdirs.MAX_RUNTIME_DIR + 1))
    work = workdirs.workdir(runtime, LONGEST_ID)
    os.makedirs(work)
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.join(work, "main.sock"))
    with pytest.raises(workdirs.RuntimeDirTooLong, match="runtime_dir"):
        workdirs.check_runtime_dir(runtime)


def test_the_operators_longest_id_under_the_default_runtime_dir() -> None:
    uid = "0" * 36
    op_id = operation_id(uid, 10**12 - 1, "f" * 36, 999999)
    assert len(op_id) == 99  # the longest the operator makes
    path = os.path.join(workdirs.workdir("/run/vmupdate", op_id), "cpr.sock")
    assert len(path) == len("/run/vmupdate/ops/") + 16 + len("/cpr.sock")


def test_folder_names_are_stable_and_distinct() -> None:
    a = workdirs.folder_name("vmu-a-g1-vm-a0")
    assert a == workdirs.folder_name("vmu-a-g1-vm-a0")
    assert a != workdirs.folder_name("vmu-a-g1-vm-a1")
    assert len(a) == workdirs.FOLDER_CHARS and all(c in "0123456789abcdef" for c in a)
    short = workdirs.folder_name("x")
    assert workdirs.workdir("/run/vmupdate", "x") == f"/run/vmupdate/ops/{short}"


def test_config_accepts_the_limit_and_refuses_one_more() -> None:
    ok = "/" + "r" * (workdirs.MAX_RUNTIME_DIR - 1)
    assert AgentConfig.model_validate({**MINIMAL, "runtime_dir": ok}).runtime_dir == ok
    too_long = ok + "x"
    with pytest.raises(ValidationError) as err:
        AgentConfig.model_validate({**MINIMAL, "runtime_dir": too_long})
    text = str(err.value)
    assert "runtime_dir" in text and f"at most {workdirs.MAX_RUNTIME_DIR}" in text
    assert f"{workdirs.MAX_RUNTIME_DIR + 1} bytes long" in text


def test_config_file_error_names_field_and_limit(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("socket_globs: [/run/vms/*/qmp.sock]\nallowed_binary_dirs: [/usr/lib/q]\n"
                   f"runtime_dir: /{'r' * 200}\n")
    with pytest.raises(ConfigError, match=rf"runtime_dir.*at most {workdirs.MAX_RUNTIME_DIR}"):
        load(cfg)


def test_multibyte_names_count_bytes() -> None:
    name = "/" + "é" * (workdirs.MAX_RUNTIME_DIR // 2)
    assert len(name) <= workdirs.MAX_RUNTIME_DIR < len(name.encode())
    with pytest.raises(workdirs.RuntimeDirTooLong):
        workdirs.check_runtime_dir(name)


def test_an_exec_runtime_dir_has_no_noexec_problem(tmp_path: Path) -> None:
    flags = os.statvfs(tmp_path).f_flag
    assert not flags & os.ST_NOEXEC, "the test needs an exec mount"
    assert workdirs.noexec_problem(str(tmp_path)) is None


def test_a_runtime_dir_that_cannot_be_inspected_names_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    problem = workdirs.noexec_problem("/run/vmupdate", seen_as=str(missing))
    assert problem == "runtime_dir: cannot inspect /run/vmupdate: No such file or directory"

