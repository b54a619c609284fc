"""Server assembly: gRPC first (health NOT_SERVING), then the engine, a warm-up, then SERVING."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from probeserve.bundle import load_bundle
from probeserve.engine import EngineConfig, VllmEngine, engine_version
from probeserve.extraction import ExtractionRequest, Extractor
from probeserve.servicer import ProbeServicer, ServerLimits, ServingState
from probeserve.tokenization import HfPieceTokenizer
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProbeService"].full_name
WARMUP_UTTERANCE = "warm up the engine"


@dataclass
class ServeConfig:
    """Everything ``probeserve serve`` needs."""

    bundle: Path
    model: Path
    precision: str = "bf16"
    host: str = "127.0.0.1"
    port: int = 50051
    max_model_len: int = 512
    max_num_seqs: int = 16
    enforce_eager: bool = True
    grace_s: float = 10.0
    limits: ServerLimits = field(default_factory=ServerLimits)


async def _set_health(servicer: HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _warm_up(extractor: Extractor) -> None:
    function = next(iter(extractor.bundle.functions))
    await extractor.extract(ExtractionRequest(function, WARMUP_UTTERANCE, "warmup"))


async def serve(config: ServeConfig) -> None:
    """Run the server until SIGTERM or SIGINT, then drain within the grace period."""
    started = time.perf_counter()
    # The head math is a few small matmuls per request: one thread is fastest, and leaves the
    # cores to the engine-core process instead of fighting it for them.
    torch.set_num_threads(1)
    bundle = load_bundle(config.bundle)
    tokenizer = HfPieceTokenizer.from_pretrained(config.model)
    state = ServingState(bundle=bundle, model=str(config.model), precision=config.precision)

    server = grpc.aio.server()
    pb_grpc.add_ProbeServiceServicer_to_server(ProbeServicer(state, config.limits), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("listening", address=f"{config.host}:{port}", bundle=bundle.name, health="NOT_SERVING")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine: VllmEngine | None = None
    try:
        engine_config = EngineConfig(
            model=config.model,
            adapter=bundle.adapter_path,
            lora_rank=bundle.lora_rank,
            precision=config.precision,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
        )
        engine_task = asyncio.create_task(asyncio.to_thread(VllmEngine.start, engine_config))
        await asyncio.wait(
            {engine_task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if not engine_task.done():
            log.info("stopped_before_ready")
            engine = await engine_task
            return
        engine = engine_task.result()
        extractor = Extractor(bundle, tokenizer, engine)
        await _warm_up(extractor)
        state.engine_version = engine_version()
        state.extractor = extractor
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving", address=f"{config.host}:{port}", startup_s=round(time.perf_counter() - started, 1)
        )
        await stop.wait()
        log.info("shutting_down", grace_s=config.grace_s)
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        state.extractor = None
        if engine is not None:
            engine.shutdown()
        log.info("stopped")
