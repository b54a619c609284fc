"""The gRPC transport: ProbeService handlers over the extraction pipeline.

Each handler converts the request, takes a lease on the bundle it names from the registry, delegates
to that bundle's :class:`Extractor`, and converts back. Errors from the core carry an
:class:`ErrorKind`; :data:`STATUS_CODES` is the one table that maps them.
Admission control, per-call limits, deadlines, metrics and the per-item log line live here too,
applied in one place (:meth:`ProbeServicer._run_item`) for unary, batch and stream items alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import structlog

from probeserve import __version__
from probeserve.core.errors import EngineUnavailableError, ErrorKind, InvalidRequestError, ProbeError
from probeserve.core.extraction import Extraction, Extractor, new_request_id
from probeserve.core.registry import BundleRegistry
from probeserve.transport import messages
from probeserve.transport.admission import Admission
from probeserve.transport.metrics import Metrics
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
# Standard gRPC name: clients whose retry policy covers the status wait this long before retrying.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass
class ServerLimits:
    """Bounds on what the server holds and what one call may ask for."""

    max_in_flight: int = 64  # items admitted at once, all calls together
    max_batch_items: int = 256
    stream_window: int = 32  # a stream's items in flight before the server stops reading it
    max_utterance_chars: int = 8192
    max_message_bytes: int = 1 << 20  # per request message, checked before any work
    retry_pushback_ms: int = 50


@dataclass
class ServingState:
    """What the handlers serve from; nothing is answered until ``ready`` (the engine is warm and
    the start-up bundles are paired and loaded)."""

    model: str
    precision: str
    registry: BundleRegistry = field(default_factory=BundleRegistry)
    ready: bool = False
    max_prompt_tokens: int = 0
    engine_version: str = ""
    log_utterances: bool = False
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def extractor(self) -> Extractor | None:
        """The default bundle's pipeline once ready (what in-process benchmarks time)."""
        if not self.ready or not len(self.registry):
            return None
        return self.registry.get("").extractor


def _error_of(exc: BaseException) -> ProbeError:
    if isinstance(exc, ProbeError):
        return exc
    return ProbeError(f"internal error: {type(exc).__name__}")


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


class ProbeServicer(pb_grpc.ProbeServiceServicer):
    """ProbeService on grpc.aio."""

    def __init__(self, state: ServingState, limits: ServerLimits | None = None) -> None:
        self.state = state
        self.limits = limits or ServerLimits()
        self.admission = Admission(self.limits.max_in_flight)
        self.metrics = state.metrics
        self.metrics.in_flight.set_function(lambda: float(self.admission.in_flight))
        self.metrics.in_flight_limit.set(self.limits.max_in_flight)
        # A running estimate of engine time, to refuse work whose deadline cannot be met. It
        # starts at the first measurement, not at zero, so it is never below every measurement.
        self._engine_estimate_s: float | None = None

    # -- one item, whatever the RPC ------------------------------------------------------------

    def _check(self, request: pb.ExtractRequest) -> None:
        size = request.ByteSize()
        if size > self.limits.max_message_bytes:
            raise InvalidRequestError(
                f"request is {size} bytes; the limit is {self.limits.max_message_bytes} bytes"
            )
        chars = len(request.utterance)
        if chars > self.limits.max_utterance_chars:
            raise InvalidRequestError(
                f"utterance is {chars} characters; the limit is {self.limits.max_utterance_chars}"
            )

    def _check_deadline(self, context: Context[Any, Any]) -> None:
        remaining = context.time_remaining()
        estimate = self._engine_estimate_s
        if remaining is not None and estimate is not None and remaining < estimate:
            raise ProbeError(
                f"deadline leaves {_ms(remaining)} ms; an extraction takes about "
                f"{_ms(estimate)} ms, so it was not started",
                ErrorKind.DEADLINE_EXCEEDED,
            )

    async def _run_item(
        self,
        request: pb.ExtractRequest,
        request_id: str,
        rpc: str,
        context: Context[Any, Any],
        arrived: float,
    ) -> Extraction:
        """Run one admitted item through the pipeline; log one line and record its metrics."""
        core = dataclasses.replace(messages.to_core(request), request_id=request_id)
        fields: dict[str, Any] = {
            "rpc": rpc,
            "request_id": core.request_id,
            "function": core.function,
            "utterance_chars": len(core.utterance),
        }
        if self.state.log_utterances:
            fields["utterance"] = core.utterance
        status = "OK"
        bundle = ""  # the label: a loaded bundle's name, never a name a caller made up
        try:
            self._check(request)
            if not self.state.ready:
                raise EngineUnavailableError("the server is starting: the engine is not ready yet")
            with self.state.registry.lease(core.bundle) as served:
                bundle = fields["bundle"] = served.name
                self._check_deadline(context)
                result = await served.extractor.extract(core)
        except asyncio.CancelledError:
            status = "CANCELLED"
            log.info("extract", status=status, total_ms=_ms(time.perf_counter() - arrived), **fields)
            raise
        except Exception as exc:
            error = _error_of(exc)
            status = STATUS_CODES[error.kind].name
            total = _ms(time.perf_counter() - arrived)
            if error.kind is ErrorKind.INTERNAL:
                log.exception("extract", status=status, total_ms=total, **fields)
            else:
                log.info("extract", status=status, error=error.message, total_ms=total, **fields)
            raise error from None
        finally:
            self.metrics.items.labels(rpc, bundle, status).inc()
        t = result.timings
        total_s = time.perf_counter() - arrived
        queue_s = max(total_s - (t.engine_ms + t.heads_ms) / 1e3, 0.0)
        stages = self.metrics.stage_latency(bundle)
        for stage, seconds in (("queue", queue_s), ("engine", t.engine_ms / 1e3),
                               ("heads", t.heads_ms / 1e3), ("total", total_s)):  # fmt: skip
            stages[stage].observe(seconds)
        self.metrics.prompt_tokens.observe(result.prompt_tokens)
        engine_s = t.engine_ms / 1e3
        previous = self._engine_estimate_s
        self._engine_estimate_s = engine_s if previous is None else 0.9 * previous + 0.1 * engine_s
        log.info(
            "extract", status=status, prompt_tokens=result.prompt_tokens, queue_ms=_ms(queue_s),
            prepare_ms=round(t.prepare_ms, 2),
            engine_ms=round(t.engine_ms, 2), heads_ms=round(t.heads_ms, 2), total_ms=_ms(total_s),
            **fields,
        )  # fmt: skip
        return result

    async def _result(
        self, request: pb.ExtractRequest, rpc: str, context: Context[Any, Any], arrived: float
    ) -> pb.ExtractResult:
        """One batch or stream item: a response, or an in-band error for that item alone.

        Either way the result carries the item's id: the caller's, or the one assigned here.
        """
        request_id = request.request_id or new_request_id()
        try:
            extraction = await self._run_item(request, request_id, rpc, context, arrived)
        except ProbeError as error:
            code = STATUS_CODES[error.kind].value[0]
            error_message = pb.ItemError(code=code, message=error.message)
            return pb.ExtractResult(request_id=request_id, error=error_message)
        return pb.ExtractResult(request_id=extraction.request_id, response=messages.to_response(extraction))

    async def _reject_overload(self, context: Context[Any, Any], rpc: str, items: int) -> None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(self.limits.retry_pushback_ms)),))
        self.metrics.calls.labels(rpc, "RESOURCE_EXHAUSTED").inc()
        self.metrics.items.labels(rpc, "", "RESOURCE_EXHAUSTED").inc(items)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server is at its limit of {self.limits.max_in_flight} items in flight "
            f"({self.admission.in_flight} now); retry after {self.limits.retry_pushback_ms} ms",
        )

    # -- RPCs ----------------------------------------------------------------------------------

    async def Extract(
        self, request: pb.ExtractRequest, context: Context[pb.ExtractRequest, pb.ExtractResponse]
    ) -> pb.ExtractResponse:
        arrived = time.perf_counter()
        if not self.admission.try_acquire():
            await self._reject_overload(context, "Extract", 1)
        code = "OK"
        try:
            request_id = request.request_id or new_request_id()
            extraction = await self._run_item(request, request_id, "Extract", context, arrived)
        except ProbeError as error:
            code = STATUS_CODES[error.kind].name
            await context.abort(STATUS_CODES[error.kind], error.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.admission.release()
            self.metrics.calls.labels("Extract", code).inc()
        return messages.to_response(extraction)

    async def ExtractBatch(
        self,
        request: pb.ExtractBatchRequest,
        context: Context[pb.ExtractBatchRequest, pb.ExtractBatchResponse],
    ) -> pb.ExtractBatchResponse:
        arrived = time.perf_counter()
        n = len(request.requests)
        if n > self.limits.max_batch_items:
            self.metrics.calls.labels("ExtractBatch", "INVALID_ARGUMENT").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch has {n} items; the limit is {self.limits.max_batch_items}",
            )
        # A batch holds at most the whole in-flight limit and runs its items that many at a time.
        slots = min(n, self.limits.max_in_flight)
        if not self.admission.try_acquire(slots):
            await self._reject_overload(context, "ExtractBatch", n)
        gate = asyncio.Semaphore(slots)

        async def item(r: pb.ExtractRequest) -> pb.ExtractResult:
            async with gate:
                return await self._result(r, "ExtractBatch", context, arrived)

        code = "OK"
        try:
            results = await asyncio.gather(*(item(r) for r in request.requests))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self.admission.release(slots)
            self.metrics.calls.labels("ExtractBatch", code).inc()
        return pb.ExtractBatchResponse(results=results)

    async def ExtractStream(
        self,
        request_iterator: AsyncIterator[pb.ExtractStreamRequest],
        context: Context[pb.ExtractStreamRequest, pb.ExtractStreamResponse],
    ) -> AsyncIterator[pb.ExtractStreamResponse]:
        """Answer in request order with up to ``stream_window`` items in flight.

        Each item waits for admission before the next is read, so a full server (or a full
        window) stops reading and gRPC flow control holds the client back. When the client goes
        away, every unfinished item is cancelled and its engine request aborted.
        """
        window: asyncio.Queue[asyncio.Task[pb.ExtractResult] | BaseException | None] = asyncio.Queue(
            maxsize=self.limits.stream_window
        )

        def release(_: asyncio.Task[pb.ExtractResult]) -> None:
            # A done callback runs even for a task cancelled before it started, whose body
            # (and any finally in it) never runs: the slot is always given back.
            self.admission.release()

        async def read() -> None:
            try:
                async for item in request_iterator:
                    arrived = time.perf_counter()
                    await self.admission.acquire()
                    task = asyncio.create_task(self._result(item.request, "ExtractStream", context, arrived))
                    task.add_done_callback(release)
                    try:
                        await window.put(task)
                    except asyncio.CancelledError:
                        task.cancel()
                        raise
            except Exception as exc:  # the request stream broke: answer what was read, then fail
                await window.put(exc)
            else:
                await window.put(None)

        reader = asyncio.create_task(read())
        code = "OK"
        try:
            while (entry := await window.get()) is not None:
                if isinstance(entry, BaseException):
                    raise entry
                yield pb.ExtractStreamResponse(result=await entry)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"
            raise
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()
            self.metrics.calls.labels("ExtractStream", code).inc()

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: Context[pb.GetInfoRequest, pb.GetInfoResponse]
    ) -> pb.GetInfoResponse:
        registry = self.state.registry
        self.metrics.calls.labels("GetInfo", "OK").inc()
        return pb.GetInfoResponse(
            model=self.state.model,
            precision=messages.PRECISIONS.get(self.state.precision, pb.PRECISION_UNSPECIFIED),
            bundles=[messages.bundle_info(e, registry.default_name) for e in registry.entries()],
            max_prompt_tokens=self.state.max_prompt_tokens,
            server_version=__version__,
            engine_version=self.state.engine_version,
        )
