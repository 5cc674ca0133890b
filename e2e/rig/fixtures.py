"""pytest fixtures for rig VMs.  Use from a conftest.py::

    from e2e.rig.fixtures import rig, vm_factory  # noqa: F401

``rig`` fails (never skips) when the rig is not provisioned.  ``vm_factory`` starts VMs and
stops every one of them at teardown, whether the test passed or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from .config import Flavour, Rig, load_rig
from .vm import TestVM, start_vm


class VMFactory:
    """``vm = await vm_factory("sid", name="a", **start_vm_kwargs)``; all stopped by close()."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.vms: list[TestVM] = []

    async def __call__(self, flavour: Flavour, *, name: str | None = None,
                       **kwargs: Any) -> TestVM:
        vm = await start_vm(self.rig, flavour, name=name or f"vm{len(self.vms)}", **kwargs)
        self.vms.append(vm)
        return vm

    def adopt(self, vm: TestVM) -> TestVM:
        """Also stop ``vm`` (e.g. built by other code) at teardown."""
        self.vms.append(vm)
        return vm

    async def close(self) -> None:
        results = await asyncio.gather(*(vm.stop() for vm in self.vms), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        self.vms.clear()
        if errors:
            raise RuntimeError(f"stopping {len(errors)} VM(s) failed: {errors!r}")

    async def __aenter__(self) -> VMFactory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@pytest.fixture(scope="session")
def rig() -> Rig:
    return load_rig()


@pytest_asyncio.fixture
async def vm_factory(rig: Rig) -> AsyncIterator[VMFactory]:
    async with VMFactory(rig) as factory:
        yield factory

