"""The kopf handlers; importing this package registers them. Each one only translates an
event and calls the logic (rollout, planning, status) -- nothing is decided here."""

from vmupdate_operator.handlers import lifecycle, vmhosts, vmupdates

__all__ = ["lifecycle", "vmhosts", "vmupdates"]
