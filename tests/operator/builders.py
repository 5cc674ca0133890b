"""Small builders for the operator's unit tests: hosts, VMs, specs, rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from vmupdate_api.crd.vmhost import HostVM
from vmupdate_api.crd.vmupdate import VMPhase, VMRolloutStatus
from vmupdate_api.crd.vmupdate_spec import VMUpdateSpec
from vmupdate_operator import planning
from vmupdate_operator.inventory import HostInventory

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
OLD = "/usr/bin/qemu-system-x86_64"
NEW = "/opt/qemu-11.1.3/bin/qemu-system-x86_64"
OLD_VERSION = "10.0.2"
NEW_VERSION = "11.1.3"
UID = "5f0c6a3e-1b2d-4c5e-8f90-a1b2c3d4e5f6"


def uuid_for(name: str) -> str:
    digits = "".join(f"{ord(c):02x}" for c in name)[:12].ljust(12, "0")
    return f"00000000-0000-4000-8000-{digits}"


def vm(name: str, *, version: str = OLD_VERSION, binary: str = OLD, pid: int = 4242,
       uuid: str | None = "auto", ready: bool = True,
       not_ready_reasons: tuple[str, ...] = ()) -> HostVM:
    return HostVM(name=name, uuid=uuid_for(name) if uuid == "auto" else uuid, pid=pid,
                  qemu_version=version, binary=binary, machine_type="pc-q35-10.0",
                  memory_mib=256, runstate="running", ready=ready,
                  not_ready_reasons=list(not_ready_reasons))


def on_target(name: str, **kwargs: Any) -> HostVM:
    return vm(name, version=NEW_VERSION, binary=NEW, **kwargs)


def host(name: str, *vms: HostVM, labels: dict[str, str] | None = None,
         heartbeat: datetime | None = T0, endpoint: str | None = "127.0.0.1:9443"
         ) -> HostInventory:
    return HostInventory(name=name, labels=labels or {}, endpoint=endpoint, heartbeat=heartbeat,
                         vms=tuple(vms))


def spec(*, selector: dict[str, Any] | None = None, strategy: dict[str, Any] | None = None,
         **fields: Any) -> VMUpdateSpec:
    data: dict[str, Any] = {
        "selector": selector if selector is not None else {"hostSelector": {}},
        "target": {"binary": NEW, "version": NEW_VERSION},
        "strategy": {"maxParallel": 10, "maxParallelPerHost": 10, **(strategy or {})},
    }
    data.update(fields)
    return VMUpdateSpec.model_validate(data)


def row(host_name: str, name: str, phase: VMPhase = VMPhase.PENDING, **fields: Any
        ) -> VMRolloutStatus:
    fields.setdefault("uuid", uuid_for(name))
    return VMRolloutStatus(host=host_name, name=name, phase=phase, **fields)


def make_plan(the_spec: VMUpdateSpec, hosts: list[HostInventory],
              rows: list[VMRolloutStatus] | tuple[VMRolloutStatus, ...] = (), *,
              now: datetime = T0 + timedelta(seconds=1), generation: int = 1,
              observed: int | None = 1, uid: str = UID, **kwargs: Any) -> planning.Plan:
    return planning.plan(uid=uid, generation=generation, observed_generation=observed,
                         spec=the_spec, hosts=hosts, rows=list(rows), now=now, **kwargs)


def by_name(plan: planning.Plan) -> dict[str, VMRolloutStatus]:
    return {r.name: r for r in plan.rows}


def phases(plan: planning.Plan) -> dict[str, VMPhase]:
    return {r.name: r.phase for r in plan.rows}


def started(plan: planning.Plan) -> list[str]:
    return [r.name for r in plan.started]
