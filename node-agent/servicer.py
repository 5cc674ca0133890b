"""The NodeAgent gRPC servicer: the edge in front of the operations.

Each call validates its request into a spec (convert.py), hands it to `Operations`
(operations.py: admission, locks, journal, recovery) and turns the answer, or a refusal,
into protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from vmupdate_agent.config import AgentConfig
from vmupdate_agent.convert import InvalidRequest, record_to_pb, report_to_pb
from vmupdate_agent.convert import operation_id as checked_operation_id
from vmupdate_agent.convert import preflight_spec as to_preflight_spec
from vmupdate_agent.convert import update_spec as to_update_spec
from vmupdate_agent.operations import Operations, Refused
from vmupdate_api.gen import agent_v1_pb2 as pb
from vmupdate_api.gen import agent_v1_pb2_grpc as pb_grpc

API_VERSIONS = ("v1",)


def agent_version() -> str:
    try:
        return importlib.metadata.version("vmupdate")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# --- the gRPC servicer ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _answering(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Turn refusals into gRPC statuses with their messages."""
    try:
        yield
    except InvalidRequest as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Refused as exc:
        await context.abort(exc.code, exc.message)


class NodeAgentService(pb_grpc.NodeAgentServicer):
    def __init__(self, operations: Operations, config: AgentConfig) -> None:
        self.ops = operations
        self.config = config
        self.started_ns = time.time_ns()

    async def GetInfo(self, request: pb.GetInfoRequest,
                      context: grpc.aio.ServicerContext[pb.GetInfoRequest, pb.GetInfoResponse]
                      ) -> pb.GetInfoResponse:
        answer = pb.GetInfoResponse(agent_version=agent_version(),
                                    node_name=self.config.node_name, api_versions=API_VERSIONS,
                                    allowed_binary_dirs=self.config.allowed_binary_dirs)
        answer.started_at.FromNanoseconds(self.started_ns)
        return answer

    async def ListVMs(self, request: pb.ListVMsRequest,
                      context: grpc.aio.ServicerContext[pb.ListVMsRequest, pb.ListVMsResponse]
                      ) -> pb.ListVMsResponse:
        return await self.ops.list_vms()

    async def Preflight(
            self, request: pb.PreflightRequest,
            context: grpc.aio.ServicerContext[pb.PreflightRequest, pb.PreflightResponse]
    ) -> pb.PreflightResponse:
        async with _answering(context):
            report = await self.ops.preflight(to_preflight_spec(request))
            return pb.PreflightResponse(report=report_to_pb(report))
        raise AssertionError("unreachable: abort raises")

    async def Update(self, request: pb.UpdateRequest,
                     context: grpc.aio.ServicerContext[pb.UpdateRequest, pb.OperationEvent]
                     ) -> AsyncIterator[pb.OperationEvent]:
        async with _answering(context):
            spec = to_update_spec(request)
            # Shielded: a client that goes away mid-admission must not leave a journaled
            # operation without a task; once admitted, it runs (and can be followed).
            op_id = await asyncio.shield(self.ops.submit(spec))
            async for event in self.ops.follow(op_id, 0):
                yield event

    async def GetOperation(
            self, request: pb.GetOperationRequest,
            context: grpc.aio.ServicerContext[pb.GetOperationRequest, pb.Operation]
    ) -> pb.Operation:
        async with _answering(context):
            record = await self.ops.get(checked_operation_id(request.operation_id))
            return record_to_pb(record)
        raise AssertionError("unreachable: abort raises")

    async def WatchOperation(
            self, request: pb.WatchOperationRequest,
            context: grpc.aio.ServicerContext[pb.WatchOperationRequest, pb.OperationEvent]
    ) -> AsyncIterator[pb.OperationEvent]:
        async with _answering(context):
            op_id = checked_operation_id(request.operation_id)
            async for event in self.ops.follow(op_id, request.after_sequence):
                yield event
