"""Fixtures for the guard tests: the QEMU rig's (only used by the @pytest.mark.qemu tests;
``rig`` fails loudly when the rig is not provisioned)."""

from e2e.rig.fixtures import rig, vm_factory

__all__ = ["rig", "vm_factory"]
