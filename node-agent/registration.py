"""The agent's side of VMHost: keep this node's VMHost object current.

Every ``interval`` seconds the agent lists its VMs (the same ListVMs the gRPC API serves, so
a VM busy with an update is reported from the facts its operation recorded, and its QMP
monitor is never probed in the middle of an update) and writes the VMHost status: one row
per VM with its QEMU and CPR readiness, the QEMU binaries the VMs run, the endpoint the
operator should dial, the agent's version and the heartbeat time. The object is created
(named after the node, ``spec.nodeName`` the same) when it does not exist.

``heartbeatTime`` is when the listing *started*, so an inventory newer than a moment
reflects everything that finished before it (the operator relies on that to tell a VM that
fell back to an old binary from an inventory taken during its update). A listing that fails
leaves the heartbeat alone and sets the Ready condition to False: the heartbeat goes stale,
which the VMHost's printer column shows and the operator treats as "this host's VMs are
unavailable".

Two ways to run it:

* in the agent process: ``run_registration(settings, operations.list_vms, stop=...)``;
* as a sidecar next to the agent (the pattern of CSI's node-driver-registrar), reading the
  inventory over the agent's own mTLS API::

      python -m vmupdate_agent.registration --agent 127.0.0.1:9443 \\
          --ca-file ca.crt --cert-file registrar.crt --key-file registrar.key \\
          --endpoint 10.0.0.11:9443 [--label vmupdate.dev/qemu-host=true] [--interval 10]

  (its certificate's identity needs the ``registrar`` role in the agent's ``client_roles``:
  GetInfo and ListVMs, nothing else).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmupdate_api.crd.conditions import (
    COND_READY,
    Condition,
    ConditionStatus,
    ConditionUpdate,
    Reason,
    condition,
)
from vmupdate_api.crd.constants import (
    API_VERSION,
    GROUP,
    KIND_VMHOST,
    MAX_HOST_VMS,
    MAX_MESSAGE,
    PLURAL_VMHOSTS,
    VERSION,
)
from vmupdate_api.crd.meta import status_merge_patch
from vmupdate_api.crd.vmhost import HostVM, QemuBinary, VMHostStatus
from vmupdate_api.crd.vmupdate_spec import CprMode
from vmupdate_api.gen import agent_v1_pb2 as pb

log = logging.getLogger(__name__)

ListVMs = Callable[[], Awaitable[pb.ListVMsResponse]]
MERGE_PATCH = "application/merge-patch+json"
MODES = {pb.MODE_CPR_EXEC: CprMode.CPR_EXEC, pb.MODE_CPR_TRANSFER: CprMode.CPR_TRANSFER,
         pb.MODE_CPR_REBOOT: CprMode.CPR_REBOOT}
MAX_BINARIES = 32
MAX_REASONS = 32


@dataclass(frozen=True)
class RegistrationSettings:
    node_name: str
    endpoint: str
    """host:port the operator dials (the pod IP, or the node's address)."""
    agent_version: str
    interval_s: float = 10.0
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels the VMHost gets (added, never removed: people may label it too)."""
    list_timeout_s: float = 60.0
    request_timeout_s: float = 15.0


# --- pure: the VMHost object from a listing --------------------------------------------------


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def version_text(v: pb.QemuVersion) -> str | None:
    if not (v.major or v.minor or v.micro):
        return None
    return f"{v.major}.{v.minor}.{v.micro}"


def host_vm(vm: pb.VM) -> HostVM:
    reasons = [_clip(r) for r in vm.readiness.reasons][:MAX_REASONS]
    if vm.busy_operation_id and len(reasons) < MAX_REASONS:
        reasons.insert(0, f"busy: operation {vm.busy_operation_id} runs on it")
    modes = [MODES[m] for m in vm.readiness.modes if m in MODES]
    return HostVM(
        name=vm.name[:253] or vm.qmp_path[:253], uuid=vm.uuid[:36] or None,
        pid=vm.pid or None, qemu_version=version_text(vm.version), binary=vm.binary or None,
        machine_type=vm.machine_type[:128] or None, memory_mib=vm.memory_bytes >> 20,
        runstate=vm.runstate[:32] or None, cpr_modes=list(dict.fromkeys(modes))[:3],
        ready=vm.readiness.ready and not vm.busy_operation_id,
        not_ready_reasons=reasons[:MAX_REASONS])


def host_status(listing: pb.ListVMsResponse, settings: RegistrationSettings,
                listed_at: datetime, conditions: Sequence[Condition]) -> VMHostStatus:
    """The VMHost status for a listing taken at ``listed_at`` (its heartbeat time)."""
    vms = [host_vm(vm) for vm in listing.vms][:MAX_HOST_VMS]
    binaries: dict[str, str | None] = {}
    for vm in vms:
        if vm.binary:
            binaries.setdefault(vm.binary, vm.qemu_version)
    ready = sum(vm.ready for vm in vms)
    message = f"serving on {settings.endpoint}: {len(vms)} VM(s), {ready} ready to update"
    if len(listing.vms) > MAX_HOST_VMS:
        message += f"; only the first {MAX_HOST_VMS} of {len(listing.vms)} VMs are listed"
    if listing.unreachable:
        bad = "; ".join(f"{u.qmp_path}: {u.error}" for u in listing.unreachable[:5])
        message += f"; {len(listing.unreachable)} QMP socket(s) did not answer ({bad})"
    ready_condition = ConditionUpdate(type=COND_READY, status=ConditionStatus.TRUE,
                                      reason=Reason.AGENT_READY, message=_clip(message))
    return VMHostStatus(
        endpoint=settings.endpoint, agent_version=settings.agent_version,
        heartbeat_time=listed_at,
        qemu_binaries=[QemuBinary(path=p, version=v) for p, v in sorted(binaries.items())
                       ][:MAX_BINARIES],
        vms=vms,
        conditions=condition(conditions, ready_condition, listed_at),
    ).summarize()


def failed_conditions(conditions: Sequence[Condition], error: str, now: datetime
                      ) -> list[Condition]:
    """Ready=False: the agent runs but could not take its inventory."""
    return condition(conditions, ConditionUpdate(
        type=COND_READY, status=ConditionStatus.FALSE, reason=Reason.AGENT_NOT_READY,
        message=_clip(f"the agent could not list its VMs: {error}")), now)


def vmhost_object(settings: RegistrationSettings) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND_VMHOST,
            "metadata": {"name": settings.node_name, "labels": dict(settings.labels)},
            "spec": {"nodeName": settings.node_name}}


# --- I/O -------------------------------------------------------------------------------------


class VMHostWriter:
    """Creates this node's VMHost and patches its status (the agent is its only writer)."""

    def __init__(self, api: Any, settings: RegistrationSettings) -> None:
        from kubernetes_asyncio import client

        self._objects: Any = client.CustomObjectsApi(api)
        self.settings = settings

    async def current_conditions(self) -> list[Condition]:
        """The object's Ready condition as stored (keeps lastTransitionTime across restarts)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            obj = await self._objects.get_cluster_custom_object(
                GROUP, VERSION, PLURAL_VMHOSTS, self.settings.node_name,
                _request_timeout=self.settings.request_timeout_s)
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        raw = (obj.get("status") or {}).get("conditions") or []
        with contextlib.suppress(ValueError):
            return [Condition.model_validate(c) for c in raw]
        return []

    async def ensure(self) -> None:
        """Create the VMHost, or add our labels to the one that exists."""
        from kubernetes_asyncio.client.exceptions import ApiException

        s = self.settings
        try:
            await self._objects.create_cluster_custom_object(
                GROUP, VERSION, PLURAL_VMHOSTS, vmhost_object(s),
                _request_timeout=s.request_timeout_s)
            log.info("created VMHost %s", s.node_name)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        if s.labels:
            await self._objects.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL_VMHOSTS, s.node_name,
                {"metadata": {"labels": dict(s.labels)}}, _content_type=MERGE_PATCH,
                _request_timeout=s.request_timeout_s)

    async def write_status(self, patch: dict[str, Any]) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        s = self.settings
        try:
            await self._objects.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL_VMHOSTS, s.node_name, patch,
                _content_type=MERGE_PATCH, _request_timeout=s.request_timeout_s)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await self.ensure()  # deleted under us: create it again, then write
            await self._objects.patch_cluster_custom_object_status(
                GROUP, VERSION, PLURAL_VMHOSTS, s.node_name, patch,
                _content_type=MERGE_PATCH, _request_timeout=s.request_timeout_s)


async def run_registration(settings: RegistrationSettings, list_vms: ListVMs, *,
                           stop: asyncio.Event, api: Any = None) -> None:
    """Keep the VMHost current until ``stop`` is set. Errors are logged and retried at the
    next interval; this task never ends the agent."""
    own_api = api is None
    if api is None:
        from vmupdate_api.kube import api_client  # kubernetes_asyncio: only when registering

        api = await api_client()
    writer = VMHostWriter(api, settings)
    conditions: list[Condition] | None = None
    try:
        while not stop.is_set():
            try:
                if conditions is None:
                    await writer.ensure()
                    conditions = await writer.current_conditions()
                conditions = await _report_once(writer, settings, list_vms, conditions)
            except Exception as exc:  # the API server or the agent is down: next round
                log.warning("VMHost %s not updated: %r", settings.node_name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.interval_s)
    finally:
        if own_api:
            await api.close()


async def _report_once(writer: VMHostWriter, settings: RegistrationSettings,
                       list_vms: ListVMs, conditions: list[Condition]) -> list[Condition]:
    listed_at = datetime.now(UTC)
    try:
        listing = await asyncio.wait_for(list_vms(), settings.list_timeout_s)
    except Exception as exc:
        failed = failed_conditions(conditions, repr(exc), listed_at)
        await writer.write_status({"status": {"conditions": [
            c.to_wire() for c in failed]}})
        return failed
    status = host_status(listing, settings, listed_at, conditions)
    await writer.write_status(status_merge_patch(status))
    return status.conditions


# --- the sidecar -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentConnection:
    target: str
    ca_file: str
    cert_file: str
    key_file: str
    server_name: str | None = None


async def _grpc_lister(conn: AgentConnection, timeout: float
                       ) -> tuple[ListVMs, Callable[[], Awaitable[pb.GetInfoResponse]],
                                  Callable[[], Awaitable[None]]]:
    import grpc
    import grpc.aio

    from vmupdate_api.gen import agent_v1_pb2_grpc as pb_grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(conn.ca_file).read_bytes(),
        private_key=Path(conn.key_file).read_bytes(),
        certificate_chain=Path(conn.cert_file).read_bytes())
    options = [("grpc.ssl_target_name_override", conn.server_name)] if conn.server_name else []
    channel = grpc.aio.secure_channel(conn.target, credentials, options=options)
    stub = pb_grpc.NodeAgentStub(channel)

    async def list_vms() -> pb.ListVMsResponse:
        answer: pb.ListVMsResponse = await stub.ListVMs(pb.ListVMsRequest(), timeout=timeout)
        return answer

    async def info() -> pb.GetInfoResponse:
        answer: pb.GetInfoResponse = await stub.GetInfo(pb.GetInfoRequest(), timeout=timeout,
                                                        wait_for_ready=True)
        return answer

    async def close() -> None:
        await channel.close(None)

    return list_vms, info, close


def _labels(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--label must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


async def _sidecar(args: argparse.Namespace) -> int:
    conn = AgentConnection(args.agent, args.ca_file, args.cert_file, args.key_file,
                           args.server_name)
    list_vms, info, close = await _grpc_lister(conn, args.list_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        deadline = time.monotonic() + args.wait_agent
        while True:  # the agent may still be starting
            try:
                about = await asyncio.wait_for(info(), 10)
                break
            except Exception as exc:
                if time.monotonic() > deadline or stop.is_set():
                    print(f"vmupdate-registrar: agent {args.agent} did not answer: {exc!r}",
                          file=sys.stderr)
                    return 1
                await asyncio.sleep(1)
        settings = RegistrationSettings(
            node_name=args.node_name or about.node_name, endpoint=args.endpoint or args.agent,
            agent_version=about.agent_version, interval_s=args.interval,
            labels=_labels(args.label), list_timeout_s=args.list_timeout)
        log.info("keeping VMHost %s current every %.0fs (agent %s at %s)", settings.node_name,
                 settings.interval_s, settings.agent_version, settings.endpoint)
        await run_registration(settings, list_vms, stop=stop)
    finally:
        await close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmupdate_agent.registration",
                                description="Keep this node's VMHost current (sidecar mode).")
    p.add_argument("--agent", required=True, help="the agent's gRPC address, host:port")
    p.add_argument("--ca-file", required=True, help="CA of the agent's serving certificate")
    p.add_argument("--cert-file", required=True, help="client certificate (allowlisted)")
    p.add_argument("--key-file", required=True)
    p.add_argument("--server-name", help="name on the agent's certificate, if not the host")
    p.add_argument("--endpoint", help="host:port the operator dials (default: --agent)")
    p.add_argument("--node-name", help="VMHost name (default: the agent's node name)")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--list-timeout", type=float, default=60.0)
    p.add_argument("--wait-agent", type=float, default=120.0,
                   help="seconds to wait for the agent at start")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.interval <= 0:
        p.error("--interval must be positive")
    try:
        _labels(args.label)
    except ValueError as exc:
        p.error(str(exc))
    return asyncio.run(_sidecar(args))


if __name__ == "__main__":
    sys.exit(main())
