"""Bearer-token authentication as a server interceptor; health checks stay open for probes.

Refused calls never reach a servicer, so the interceptor reports each one (``on_denied``): an
operator must be able to tell an attack or a misconfigured caller from silence.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _deny_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


if TYPE_CHECKING:  # grpc-stubs makes the class generic; at run time it is not subscriptable
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class BearerTokenInterceptor(_Interceptor):
    """Admit calls whose ``authorization`` metadata is ``Bearer <token>`` for a known token."""

    def __init__(
        self,
        tokens: Iterable[str],
        open_methods: frozenset[str] = OPEN_METHODS,
        on_denied: Callable[[str], None] | None = None,
    ) -> None:
        self._expected = [f"Bearer {t}".encode() for t in tokens if t]
        if not self._expected:
            raise ValueError("at least one non-empty token is required")
        self._open = open_methods
        self._on_denied = on_denied  # called with the full method name of each refused call

    def _authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return any(hmac.compare_digest(given, e) for e in self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        if self._on_denied is not None:
            self._on_denied(handler_call_details.method)
        return _deny_handler(handler)
