"""The gRPC transport: ProbeService handlers over the extraction pipeline.

Each handler converts the request, delegates to the :class:`Extractor`, and converts back. Errors
from the core carry an :class:`ErrorKind`; :data:`STATUS_CODES` is the one table that maps them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog

from probeserve import __version__, messages
from probeserve.bundle import Bundle
from probeserve.errors import EngineUnavailableError, ErrorKind, InvalidRequestError, ProbeError
from probeserve.extraction import Extraction, ExtractionRequest, Extractor, new_request_id
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)
Context = grpc.aio.ServicerContext

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


@dataclass
class ServerLimits:
    """Bounds on what one call may ask for."""

    max_batch_items: int = 256
    stream_window: int = 32  # stream items in flight before the server stops reading


@dataclass
class ServingState:
    """What the handlers serve from; ``extractor`` is None until the engine is warm."""

    bundle: Bundle
    model: str
    precision: str
    engine_version: str = ""
    extractor: Extractor | None = None


def _error_of(exc: BaseException) -> ProbeError:
    if isinstance(exc, ProbeError):
        return exc
    return ProbeError(f"internal error: {type(exc).__name__}")


class ProbeServicer(pb_grpc.ProbeServiceServicer):
    """ProbeService on grpc.aio."""

    def __init__(self, state: ServingState, limits: ServerLimits | None = None) -> None:
        self.state = state
        self.limits = limits or ServerLimits()

    async def _extract(self, request: pb.ExtractRequest, rpc: str) -> Extraction:
        """Run one item through the pipeline and log one line for it, whatever the outcome."""
        core = messages.to_core(request)
        if not core.request_id:
            core = ExtractionRequest(core.function, core.utterance, new_request_id(), core.bundle)
        started = time.perf_counter()
        fields = {
            "rpc": rpc,
            "request_id": core.request_id,
            "function": core.function,
            "utterance_chars": len(core.utterance),
        }
        try:
            extractor = self.state.extractor
            if extractor is None:
                raise EngineUnavailableError("the server is starting: the engine is not ready yet")
            result = await extractor.extract(core)
        except asyncio.CancelledError:
            log.info("extract", status="CANCELLED", total_ms=_ms(started), **fields)
            raise
        except Exception as exc:
            error = _error_of(exc)
            status = STATUS_CODES[error.kind].name
            if error.kind is ErrorKind.INTERNAL:
                log.exception("extract", status=status, total_ms=_ms(started), **fields)
            else:
                log.info("extract", status=status, error=error.message, total_ms=_ms(started), **fields)
            raise error from None
        t = result.timings
        log.info(
            "extract",
            status="OK",
            prompt_tokens=result.prompt_tokens,
            prepare_ms=round(t.prepare_ms, 2),
            engine_ms=round(t.engine_ms, 2),
            heads_ms=round(t.heads_ms, 2),
            total_ms=_ms(started),
            **fields,
        )
        return result

    async def _result(self, request: pb.ExtractRequest, rpc: str) -> pb.ExtractResult:
        """One batch or stream item: a response, or an in-band error for that item alone."""
        try:
            extraction = await self._extract(request, rpc)
        except ProbeError as error:
            code = STATUS_CODES[error.kind].value[0]
            return pb.ExtractResult(
                request_id=request.request_id, error=pb.ItemError(code=code, message=error.message)
            )
        return pb.ExtractResult(request_id=extraction.request_id, response=messages.to_response(extraction))

    async def Extract(
        self, request: pb.ExtractRequest, context: Context[pb.ExtractRequest, pb.ExtractResponse]
    ) -> pb.ExtractResponse:
        try:
            extraction = await self._extract(request, "Extract")
        except ProbeError as error:
            await context.abort(STATUS_CODES[error.kind], error.message)
        return messages.to_response(extraction)

    async def ExtractBatch(
        self,
        request: pb.ExtractBatchRequest,
        context: Context[pb.ExtractBatchRequest, pb.ExtractBatchResponse],
    ) -> pb.ExtractBatchResponse:
        n = len(request.requests)
        if n > self.limits.max_batch_items:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch has {n} items; at most {self.limits.max_batch_items} are allowed",
            )
        results = await asyncio.gather(*(self._result(r, "ExtractBatch") for r in request.requests))
        return pb.ExtractBatchResponse(results=results)

    async def ExtractStream(
        self,
        request_iterator: AsyncIterator[pb.ExtractStreamRequest],
        context: Context[pb.ExtractStreamRequest, pb.ExtractStreamResponse],
    ) -> AsyncIterator[pb.ExtractStreamResponse]:
        """Answer in request order with up to ``stream_window`` items in flight.

        When the window is full the server stops reading, so gRPC flow control holds the client
        back; when the client goes away, every unfinished item is cancelled (and its engine
        request aborted).
        """
        window: asyncio.Queue[asyncio.Task[pb.ExtractResult] | BaseException | None] = asyncio.Queue(
            maxsize=self.limits.stream_window
        )

        async def read() -> None:
            try:
                async for item in request_iterator:
                    await window.put(asyncio.create_task(self._result(item.request, "ExtractStream")))
            except Exception as exc:  # the request stream broke: answer what was read, then fail
                await window.put(exc)
            else:
                await window.put(None)

        reader = asyncio.create_task(read())
        try:
            while (entry := await window.get()) is not None:
                if isinstance(entry, BaseException):
                    raise entry
                yield pb.ExtractStreamResponse(result=await entry)
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if isinstance(leftover, asyncio.Task):
                    leftover.cancel()

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: Context[pb.GetInfoRequest, pb.GetInfoResponse]
    ) -> pb.GetInfoResponse:
        extractor = self.state.extractor
        return pb.GetInfoResponse(
            model=self.state.model,
            precision=messages.PRECISIONS.get(self.state.precision, pb.PRECISION_UNSPECIFIED),
            bundles=[messages.bundle_info(self.state.bundle)],
            max_prompt_tokens=extractor.engine.max_prompt_tokens if extractor else 0,
            server_version=__version__,
            engine_version=self.state.engine_version,
        )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1e3, 2)


__all__ = ["STATUS_CODES", "InvalidRequestError", "ProbeServicer", "ServerLimits", "ServingState"]
