"""Who may call what: a role per client identity, checked on every call.

A valid client certificate (mutual TLS, checked in the handshake) only says who the caller
is. Its identity (subject CN, or a DNS/URI SAN) is looked up in the agent's configuration,
which gives each identity a role; the role names the RPCs it may call:

- ``operator``: everything (it updates VMs, preflights them, watches the operations);
- ``registrar``: the inventory only (``GetInfo``, ``ListVMs``) and health checking — the
  VMHost registrar needs nothing else, so a stolen registrar key cannot start a QEMU.

An identity without a role is refused every call (``PERMISSION_DENIED``), health and
reflection included; a role calling outside its list is refused naming the role and what it
may call. The decision is the pure `allowed`; `AuthorizationInterceptor` applies it to every
call of the grpc.aio server, so the servicers need not know about it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

NODE_AGENT = "/vmupdate.agent.v1.NodeAgent/"
HEALTH = "/grpc.health.v1.Health/"


class Role(StrEnum):
    OPERATOR = "operator"
    REGISTRAR = "registrar"


# None: every method of every service.
ROLE_METHODS: Mapping[Role, frozenset[str] | None] = {
    Role.OPERATOR: None,
    Role.REGISTRAR: frozenset({
        NODE_AGENT + "GetInfo", NODE_AGENT + "ListVMs", HEALTH + "Check", HEALTH + "Watch",
    }),
}


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The names a client certificate presents: subject CN and SANs (DNS, URI, ...)."""
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()):
            text = value.decode(errors="replace")
            if text not in names:
                names.append(text)
    return names


def identity_allowed(identities: Sequence[str], allowlist: Sequence[str]) -> bool:
    return any(name in allowlist for name in identities)


def role_table(by_role: Mapping[Role, Sequence[str]]) -> dict[str, Role]:
    """identity -> role from the configuration's role -> identities; an identity listed
    under two roles is a configuration error (ValueError)."""
    table: dict[str, Role] = {}
    for role, names in by_role.items():
        for name in names:
            if table.get(name, role) != role:
                raise ValueError(f"client identity {name!r} is listed under two roles "
                                 f"({table[name]} and {role}); give it one")
            table[name] = role
    return table


def roles_of(identities: Sequence[str], roles: Mapping[str, Role]) -> list[Role]:
    """The roles the presented identities hold (a certificate may carry several names)."""
    found: list[Role] = []
    for name in identities:
        role = roles.get(name)
        if role is not None and role not in found:
            found.append(role)
    return found


def allowed(method: str, held: Sequence[Role]) -> bool:
    for role in held:
        methods = ROLE_METHODS[role]
        if methods is None or method in methods:
            return True
    return False


def refusal(method: str, identities: Sequence[str], held: Sequence[Role]) -> str:
    """The PERMISSION_DENIED message for a refused call."""
    who = ", ".join(identities) or "(none)"
    if not held:
        return f"client identity {who} is not allowed to call this agent"
    may = sorted({m.rsplit("/", 1)[-1] for r in held for m in (ROLE_METHODS[r] or ())})
    return (f"client identity {who} (role {', '.join(held)}) may not call "
            f"{method.lstrip('/')}; that role may call only {', '.join(may)}")


# A string: the generic form exists only in the type stubs.
Continuation = Callable[[grpc.HandlerCallDetails],
                        Awaitable["grpc.RpcMethodHandler[Any, Any]"]]


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses (PERMISSION_DENIED) every call its caller's role does not allow.

    aio interceptors do not see the call's context, so the handler is wrapped: the check
    runs first in the call, with `context.auth_context()` and the method's full name.
    """

    def __init__(self, roles: Mapping[str, Role]) -> None:
        self.roles = dict(roles)

    def _checker(self, method: str
                 ) -> Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            names = peer_identities(context.auth_context())
            held = roles_of(names, self.roles)
            if not allowed(method, held):
                log.warning("refused %s from client identity %s (roles %s, peer %s)", method,
                            names or "(none)", [str(r) for r in held] or "none",
                            context.peer())
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    refusal(method, names, held))

        return check

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        check = self._checker(handler_call_details.method)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                make = getattr(grpc, f"{kind}_rpc_method_handler")
                wrapped: grpc.RpcMethodHandler[Any, Any] = make(
                    _checked(behaviour, check),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
                return wrapped
        return handler


def _checked(behaviour: Callable[..., Any],
             check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
             ) -> Callable[..., Any]:
    """`behaviour` with `check` first; aio handlers are coroutines or async generators."""
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            await check(context)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def call(request: Any, context: Any) -> Any:
        await check(context)
        return await behaviour(request, context)

    return call
