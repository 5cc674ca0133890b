"""Loaders for the recorded QMP answers under fixtures/ (see fixtures/make_variants.py)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vmupdate_agent import discovery
from vmupdate_agent.models import VMInfo

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BASE = "raw-sid-11.1.3-memfd"


def raw_path(name: str) -> Path:
    if name == BASE:
        return FIXTURES / f"{BASE}.json"
    return FIXTURES / "variants" / f"{name}.json"


def read_raw(name: str = BASE) -> dict[str, Any]:
    """A fresh copy of a recorded (or derived) gather_raw answer, by fixture name."""
    data: dict[str, Any] = json.loads(raw_path(name).read_text())
    return data


def read_vm(name: str = BASE) -> VMInfo:
    return discovery.build_vm_info(read_raw(name))


def read_schema(version: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((FIXTURES / f"schema-{version}.json").read_text())
    return data


def variants_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_variants",
                                                  FIXTURES / "make_variants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_raw() -> Callable[[str], dict[str, Any]]:
    return read_raw


@pytest.fixture
def load_vm() -> Callable[[str], VMInfo]:
    return read_vm


@pytest.fixture
def load_schema() -> Callable[[str], list[dict[str, Any]]]:
    return read_schema


@pytest.fixture(scope="session")
def make_variants() -> ModuleType:
    return variants_module()
