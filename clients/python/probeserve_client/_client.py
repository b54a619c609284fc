"""ProbeClient (blocking) and AsyncProbeClient (asyncio): same methods, same results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import wrappers_pb2

from probeserve_client import _convert
from probeserve_client._errors import ProbeServeError, from_rpc_error
from probeserve_client._proto.probeserve.v1 import admin_service_pb2 as admin_pb
from probeserve_client._proto.probeserve.v1 import admin_service_pb2_grpc as admin_grpc
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2_grpc as pb_grpc
from probeserve_client._types import (
    BundleList,
    Extraction,
    ExtractItem,
    ExtractResult,
    LoadedBundle,
    ServerInfo,
    UnloadedBundle,
)

Metadata = Sequence[tuple[str, str]]
Item = ExtractItem | tuple[str, str]
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


# grpc.health.v1's HealthCheckRequest{string service = 1} and HealthCheckResponse{enum status = 1}
# have the wire format of the well-known StringValue and Int32Value, so the SDK needs no
# grpcio-health-checking dependency to ask the standard health service.
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _health_status(reply: wrappers_pb2.Int32Value) -> str:
    return _HEALTH_STATUS.get(reply.value, "UNKNOWN")


def _stream_requests(items: Iterable[Item], bundle: str = "") -> Iterator[pb.ExtractStreamRequest]:
    for item in items:
        yield pb.ExtractStreamRequest(request=_convert.to_request(_convert.to_item(item, bundle)))


class ResultStream:
    """Results of :meth:`ProbeClient.stream`, in request order; ``cancel()`` ends the call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[ExtractResult]:
        try:
            for response in self._call:
                yield _convert.from_result(response.result)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return
            raise from_rpc_error(error) from None

    def cancel(self) -> None:
        self._call.cancel()


class _ClientCore:
    """What both clients hold: the stubs over one channel, and the call defaults."""

    def _bind(self, channel: Any, timeout: float | None, metadata: Metadata) -> None:
        self._channel = channel
        self._stub = pb_grpc.ProbeServiceStub(channel)
        self._admin = admin_grpc.AdminServiceStub(channel)
        self._health = channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.Int32Value.FromString,
        )
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def _kw(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": tuple(self.metadata) + tuple(metadata or ()),
        }


class ProbeClient(_ClientCore):
    """Blocking client. Use as a context manager, or call :meth:`close`.

    ``target`` is any gRPC target: ``host:port``; ``dns:///name:port``, where the name may resolve
    to many addresses (e.g. a Kubernetes headless Service, one address per replica);
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` or ``ipv6:[::1]:50051,...`` for a fixed list.

    Keyword-only settings (times in seconds):

    - ``timeout``: the default deadline of each call; every method takes its own.
    - ``metadata``: sent with every call, before a call's own.
    - ``credentials``: ``grpc.ssl_channel_credentials(...)`` for TLS; plaintext if ``None``.
    - ``retries``: calls that fail with UNAVAILABLE are retried by gRPC itself up to this many
      times (exponential back-off from 0.1 s to 2 s); 0 turns retries off.
    - ``load_balancing``: gRPC's load-balancing policy over the target's addresses, e.g.
      ``"round_robin"`` (one connection per address, calls spread over the ready ones) or
      ``"pick_first"`` (gRPC's default: one connection, the first address that answers).
    - ``keepalive_s``: interval of HTTP/2 keepalive pings (``None`` or 0: no pings);
      ``keepalive_timeout_s``: how long to wait for a ping's answer before the connection is
      considered dead (``None``: gRPC's default, 20 s).
    - ``reconnect_backoff_s`` / ``max_reconnect_backoff_s``: first and largest delay between
      attempts to reconnect to an address that went away (``None``: gRPC's defaults, 1 s and
      120 s). Lower the maximum when replicas restart often, so a restarted one rejoins soon.
    - ``options``: raw gRPC channel options, applied last (they override the above).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        retries: int = 3,
        load_balancing: str | None = None,
        keepalive_s: float | None = 30.0,
        keepalive_timeout_s: float | None = None,
        reconnect_backoff_s: float | None = None,
        max_reconnect_backoff_s: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = _convert.channel_options(
            retries=retries,
            load_balancing=load_balancing,
            keepalive_s=keepalive_s,
            keepalive_timeout_s=keepalive_timeout_s,
            reconnect_backoff_s=reconnect_backoff_s,
            max_reconnect_backoff_s=max_reconnect_backoff_s,
            extra=options,
        )
        channel = (
            grpc.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._bind(channel, timeout, metadata)

    def extract(
        self,
        function: str,
        utterance: str,
        *,
        request_id: str = "",
        bundle: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Extraction:
        """Extract the slots of one utterance; raises :class:`ProbeServeError`."""
        request = _convert.to_request(ExtractItem(function, utterance, request_id, bundle))
        try:
            response = self._stub.Extract(request, **self._kw(timeout, metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _convert.from_response(response)

    def extract_batch(
        self,
        items: Iterable[Item],
        *,
        bundle: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[ExtractResult]:
        """Extract many utterances in one call; each result holds an extraction or its error.

        ``bundle`` answers the items that name none (each item may name its own)."""
        items = _convert.to_items(items, bundle)
        request = pb.ExtractBatchRequest(requests=[_convert.to_request(i) for i in items])
        try:
            response = self._stub.ExtractBatch(request, **self._kw(timeout, metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return [_convert.from_result(r) for r in response.results]

    def stream(
        self,
        items: Iterable[Item],
        *,
        bundle: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResultStream:
        """Send ``items`` while iterating results (request order). ``timeout`` bounds the call;
        ``bundle`` answers the items that name none, so one stream may mix bundles item by item."""
        call = self._stub.ExtractStream(_stream_requests(items, bundle), **self._kw(timeout, metadata))
        return ResultStream(call)

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        try:
            return _convert.from_info(self._stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout, None)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health check's status name: SERVING, NOT_SERVING, ..."""
        try:
            reply = self._health(wrappers_pb2.StringValue(value=service), **self._kw(timeout, None))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _health_status(reply)

    # -- AdminService (the server must run with --admin) ---------------------------------------

    def load_bundle(
        self,
        path: str,
        *,
        name: str = "",
        replace: bool = False,
        make_default: bool = False,
        timeout: float | None = None,
    ) -> LoadedBundle:
        """Load a bundle directory that lies on the server; the pairing check runs first."""
        request = admin_pb.LoadBundleRequest(path=path, name=name, replace=replace, make_default=make_default)
        try:
            return _convert.from_loaded(self._admin.LoadBundle(request, **self._kw(timeout, None)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def unload_bundle(self, name: str, *, timeout: float | None = None) -> UnloadedBundle:
        """Stop serving a bundle once its admitted requests are answered."""
        request = admin_pb.UnloadBundleRequest(name=name)
        try:
            return _convert.from_unloaded(self._admin.UnloadBundle(request, **self._kw(timeout, None)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def bundles(self, *, timeout: float | None = None) -> BundleList:
        """The loaded bundles, and the adapters the engine holds."""
        try:
            return _convert.from_bundle_list(
                self._admin.ListBundles(admin_pb.ListBundlesRequest(), **self._kw(timeout, None))
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ProbeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncResultStream:
    """Results of :meth:`AsyncProbeClient.stream`, in request order; ``cancel()`` ends the call."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    async def __aiter__(self) -> AsyncIterator[ExtractResult]:
        try:
            async for response in self._call:
                yield _convert.from_result(response.result)
        except asyncio.CancelledError:
            # grpc.aio reports a call cancelled by cancel() as CancelledError: that ends the
            # iteration. Any other cancellation (of the task iterating) propagates.
            if self._cancelled:
                return
            raise
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise from_rpc_error(error) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


async def _async_stream_requests(
    items: Iterable[Item] | AsyncIterable[Item], bundle: str = ""
) -> AsyncIterator[pb.ExtractStreamRequest]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield pb.ExtractStreamRequest(request=_convert.to_request(_convert.to_item(item, bundle)))
    else:
        for request in _stream_requests(items, bundle):
            yield request


class AsyncProbeClient(_ClientCore):
    """asyncio client with the same methods as :class:`ProbeClient`; use ``async with``.

    Takes the same ``target`` forms and keyword-only settings as :class:`ProbeClient`
    (``timeout``, ``metadata``, ``credentials``, ``retries``, ``load_balancing``,
    ``keepalive_s``, ``keepalive_timeout_s``, ``reconnect_backoff_s``,
    ``max_reconnect_backoff_s``, ``options``), with the same meaning.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        retries: int = 3,
        load_balancing: str | None = None,
        keepalive_s: float | None = 30.0,
        keepalive_timeout_s: float | None = None,
        reconnect_backoff_s: float | None = None,
        max_reconnect_backoff_s: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = _convert.channel_options(
            retries=retries,
            load_balancing=load_balancing,
            keepalive_s=keepalive_s,
            keepalive_timeout_s=keepalive_timeout_s,
            reconnect_backoff_s=reconnect_backoff_s,
            max_reconnect_backoff_s=max_reconnect_backoff_s,
            extra=options,
        )
        channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._bind(channel, timeout, metadata)

    async def extract(
        self,
        function: str,
        utterance: str,
        *,
        request_id: str = "",
        bundle: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Extraction:
        request = _convert.to_request(ExtractItem(function, utterance, request_id, bundle))
        try:
            response = await self._stub.Extract(request, **self._kw(timeout, metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _convert.from_response(response)

    async def extract_batch(
        self,
        items: Iterable[Item],
        *,
        bundle: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> list[ExtractResult]:
        items = _convert.to_items(items, bundle)
        request = pb.ExtractBatchRequest(requests=[_convert.to_request(i) for i in items])
        try:
            response = await self._stub.ExtractBatch(request, **self._kw(timeout, metadata))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return [_convert.from_result(r) for r in response.results]

    def stream(
        self,
        items: Iterable[Item] | AsyncIterable[Item],
        *,
        bundle: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncResultStream:
        requests = _async_stream_requests(items, bundle)
        call = self._stub.ExtractStream(requests, **self._kw(timeout, metadata))
        return AsyncResultStream(call)

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        try:
            return _convert.from_info(
                await self._stub.GetInfo(pb.GetInfoRequest(), **self._kw(timeout, None))
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        try:
            reply = await self._health(wrappers_pb2.StringValue(value=service), **self._kw(timeout, None))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _health_status(reply)

    async def load_bundle(
        self,
        path: str,
        *,
        name: str = "",
        replace: bool = False,
        make_default: bool = False,
        timeout: float | None = None,
    ) -> LoadedBundle:
        request = admin_pb.LoadBundleRequest(path=path, name=name, replace=replace, make_default=make_default)
        try:
            return _convert.from_loaded(await self._admin.LoadBundle(request, **self._kw(timeout, None)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def unload_bundle(self, name: str, *, timeout: float | None = None) -> UnloadedBundle:
        request = admin_pb.UnloadBundleRequest(name=name)
        try:
            return _convert.from_unloaded(await self._admin.UnloadBundle(request, **self._kw(timeout, None)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def bundles(self, *, timeout: float | None = None) -> BundleList:
        request = admin_pb.ListBundlesRequest()
        try:
            return _convert.from_bundle_list(
                await self._admin.ListBundles(request, **self._kw(timeout, None))
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncProbeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


__all__ = ["AsyncProbeClient", "AsyncResultStream", "ProbeClient", "ProbeServeError", "ResultStream"]
