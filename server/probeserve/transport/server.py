"""Server assembly: gRPC first (health NOT_SERVING), then the engine, a warm-up, then SERVING.

Shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, new calls are refused, calls in flight
finish within the grace period, then the engine shuts down and the process exits 0. If the
engine dies, a watchdog turns health NOT_SERVING; calls then fail fast with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from probeserve.core.bundle import Bundle, load_bundle
from probeserve.core.extraction import ExtractionRequest, Extractor
from probeserve.core.tokenization import HfPieceTokenizer
from probeserve.engines.config import (
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_EAGER,
    DEFAULT_ENGINE,
    EngineConfig,
    ServingEngine,
    engine_version,
)
from probeserve.engines.start import start_engine
from probeserve.pairing.checks import Check, PairingError, function_checks, raise_on_failure, static_checks
from probeserve.transport.auth import BearerTokenInterceptor
from probeserve.transport.servicer import ProbeServicer, ServerLimits, ServingState
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProbeService"].full_name
WARMUP_UTTERANCE = "warm up the engine"
WATCHDOG_INTERVAL_S = 0.5
# gRPC refuses larger messages itself (RESOURCE_EXHAUSTED) before any handler runs; below it,
# ServerLimits.max_message_bytes gives INVALID_ARGUMENT with the limit named.
HARD_MESSAGE_CAP = 64 << 20


@dataclass
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass
class ServeConfig:
    """Everything ``probeserve serve`` needs."""

    bundle: Path
    model: Path
    precision: str = "bf16"
    lora_mode: str = "adapter"
    inline: bool = DEFAULT_ENGINE == "inline"
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    load_format: str = "auto"
    max_model_len: int = 512
    max_num_seqs: int = 16
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = DEFAULT_EAGER
    tensor_parallel_size: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    skip_pairing_check: bool = False
    grace_s: float = 10.0
    limits: ServerLimits = field(default_factory=ServerLimits)
    tls: TlsConfig | None = None
    auth_tokens: tuple[str, ...] = ()
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    log_utterances: bool = False
    # Close each client connection after this long (then a grace of the same length for calls
    # on it), so clients that balance over DNS re-resolve and find new replicas. None: never.
    max_connection_age_s: float | None = None

    def engine_config(self, bundle: Bundle) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            adapter=bundle.adapter_path,
            lora_rank=bundle.lora_rank,
            precision=self.precision,
            lora_mode=self.lora_mode,
            inline=self.inline,
            batch_wait_ms=self.batch_wait_ms,
            load_format=self.load_format,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
        )


def _heads_beside_engine(bundle: Bundle) -> Bundle:
    """On a GPU machine the heads run on the GPU, where the engine's hidden states are made."""
    if not torch.cuda.is_available():
        return bundle
    return dataclasses.replace(bundle, heads=bundle.heads.to("cuda"))


async def _set_health(servicer: HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _warm_up(extractor: Extractor) -> None:
    function = next(iter(extractor.bundle.functions))
    await extractor.extract(ExtractionRequest(function, WARMUP_UTTERANCE, "warmup"))


def _static_pairing(config: ServeConfig, bundle: Bundle) -> list[Check]:
    """Structure and provenance, before the engine starts; raises PairingError on a failure."""
    checks = static_checks(bundle, config.model, config.precision)
    raise_on_failure(checks)
    return checks


async def _function_pairing(config: ServeConfig, extractor: Extractor) -> list[Check]:
    """The calibration references through the running engine; raises PairingError on a failure."""
    checks = await function_checks(extractor.bundle, extractor.prompts, extractor.engine, config.precision)
    raise_on_failure(checks)
    log.info("pairing_passed", checks=len(checks), precision=config.precision, lora_mode=config.lora_mode)
    return checks


def _log_failed(exc: PairingError) -> None:
    check = exc.check
    log.error(
        "pairing_failed", check=check.name, measured=check.measured, threshold=check.threshold,
        detail=check.detail, action="not serving; --skip-pairing-check overrides (not advised)",
    )  # fmt: skip


async def check_pairing(config: ServeConfig, keep_going: bool = False) -> list[Check]:
    """Every pairing check, as ``serve`` runs them, without a gRPC server.

    A failed static check ends it (as it ends ``serve``) unless ``keep_going``: then the engine
    checks run too, to show how far from the source the model answers.
    """
    bundle = load_bundle(config.bundle)
    checks = static_checks(bundle, config.model, config.precision)
    if not keep_going and any(not c.passed for c in checks):
        return checks
    engine = await asyncio.to_thread(start_engine, config.engine_config(bundle))
    try:
        extractor = Extractor(bundle, HfPieceTokenizer.from_pretrained(config.model), engine)
        return checks + await function_checks(bundle, extractor.prompts, engine, config.precision)
    finally:
        engine.shutdown()


async def _watch_engine(engine: ServingEngine, health: HealthServicer, state: ServingState) -> None:
    """Turn health NOT_SERVING as soon as the engine is found dead."""
    while not engine.errored:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
    log.error("engine_dead", action="health NOT_SERVING; calls get UNAVAILABLE")
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)


def _build_server(config: ServeConfig, state: ServingState) -> tuple[grpc.aio.Server, HealthServicer, int]:
    interceptors = [BearerTokenInterceptor(config.auth_tokens)] if config.auth_tokens else []
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", HARD_MESSAGE_CAP),
        ("grpc.max_send_message_length", HARD_MESSAGE_CAP),
    ]
    if config.max_connection_age_s:
        age_ms = int(config.max_connection_age_s * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    pb_grpc.add_ProbeServiceServicer_to_server(ProbeServicer(state, config.limits), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        port = server.add_secure_port(address, config.tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, health_servicer, port


async def serve(
    config: ServeConfig,
    *,
    stop: asyncio.Event | None = None,
    on_serving: Callable[[ServingState, int], None] | None = None,
) -> None:
    """Run the server until SIGTERM or SIGINT (or ``stop`` is set), then drain within the grace
    period. ``on_serving(state, port)`` runs once health says SERVING: benchmarks use it to time
    the same engine in-process and through gRPC."""
    started = time.perf_counter()
    # The head math is a few small matmuls per request: one thread is fastest, and leaves the
    # cores to the engine-core process instead of fighting it for them.
    torch.set_num_threads(1)
    bundle = _heads_beside_engine(load_bundle(config.bundle))
    tokenizer = HfPieceTokenizer.from_pretrained(config.model)
    state = ServingState(
        bundle=bundle,
        model=str(config.model),
        precision=config.precision,
        log_utterances=config.log_utterances,
    )
    if config.log_utterances:
        log.warning("logging_utterances", note="utterance text goes into the logs (--log-utterances)")
    server, health_servicer, port = _build_server(config, state)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = state.metrics.serve(config.metrics_host, config.metrics_port)
    log.info(
        "listening", address=f"{config.host}:{port}", tls=config.tls is not None,
        auth=bool(config.auth_tokens), metrics_port=metrics_port, bundle=bundle.name, health="NOT_SERVING",
    )  # fmt: skip

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine: ServingEngine | None = None
    watchdog: asyncio.Task[None] | None = None
    try:
        if config.skip_pairing_check:
            log.warning(
                "pairing_check_skipped", model=str(config.model), bundle=bundle.name,
                note="--skip-pairing-check: nothing shows this model is the one the bundle was trained for",
            )  # fmt: skip
        else:
            _static_pairing(config, bundle)
        engine_task = asyncio.create_task(asyncio.to_thread(start_engine, config.engine_config(bundle)))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({engine_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not engine_task.done():
            log.info("stopped_before_ready")
            engine = await engine_task
            return
        engine = engine_task.result()
        live_engine = engine
        state.metrics.watch_engine(live_engine.unfinished_requests, lambda: not live_engine.errored)
        extractor = Extractor(bundle, tokenizer, engine)
        await _warm_up(extractor)
        if not config.skip_pairing_check:
            await _function_pairing(config, extractor)
        state.engine_version = engine_version()
        state.extractor = extractor
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        watchdog = asyncio.create_task(_watch_engine(engine, health_servicer, state))
        log.info(
            "serving", address=f"{config.host}:{port}", startup_s=round(time.perf_counter() - started, 1)
        )
        if on_serving is not None:
            on_serving(state, port)
        await stop.wait()
    except PairingError as exc:
        _log_failed(exc)
        raise
    finally:
        drain_started = time.perf_counter()
        log.info("shutting_down", grace_s=config.grace_s)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        drained_s = round(time.perf_counter() - drain_started, 2)
        if watchdog is not None:
            watchdog.cancel()
        state.extractor = None
        if engine is not None:
            engine.shutdown()
        log.info("stopped", drain_s=drained_s, total_s=round(time.perf_counter() - drain_started, 2))
