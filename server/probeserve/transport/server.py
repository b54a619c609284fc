"""Server assembly: gRPC first (health NOT_SERVING), then the engine, the bundles (each warmed
up and paired), then SERVING. With ``admin``, AdminService loads and unloads bundles later.

Shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, new calls are refused, calls in flight
finish within the grace period, then the engine shuts down and the process exits 0. If the
engine dies, a watchdog turns health NOT_SERVING; calls then fail fast with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import ipaddress
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

from probeserve.core.bundle import Bundle
from probeserve.core.errors import ProbeError
from probeserve.core.extraction import Extractor
from probeserve.core.tokenization import HfPieceTokenizer
from probeserve.engines.config import (
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_EAGER,
    DEFAULT_ENGINE,
    WEIGHTS_HOLD_ADAPTER,
    EngineConfig,
    ServingEngine,
    bind,
    engine_version,
    specialize_by_default,
)
from probeserve.engines.start import start_engine
from probeserve.pairing.checks import Check, PairingError, function_checks, static_checks
from probeserve.transport.admin import AdminServicer
from probeserve.transport.auth import BearerTokenInterceptor
from probeserve.transport.bundles import BundleLoader, BundleSpec, Pairing, read_bundle
from probeserve.transport.servicer import ProbeServicer, ServerLimits, ServingState
from probeserve_client._proto.probeserve.v1 import admin_service_pb2, admin_service_pb2_grpc
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProbeService"].full_name
ADMIN_SERVICE_NAME = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# Adapter slots per engine step when --admin may bring more bundles than the start-up ones.
ADMIN_MIN_LORAS = 4
# The LoRA rank the engine is sized for with --admin when the start-up bundles' is lower.
ADMIN_MIN_LORA_RANK = 16
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

    bundles: tuple[BundleSpec, ...]
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
    # The bundle that answers requests naming none ('' : the first); AdminService (--admin).
    default_bundle: str = ""
    admin: bool = False
    # Adapters one engine step may mix, and the largest LoRA rank (None: from the bundles).
    max_loras: int | None = None
    max_lora_rank: int | None = None
    specialize_active_lora: bool | None = None  # None: specialize_by_default

    def engine_config(self, bundles: list[Bundle]) -> EngineConfig:
        if self.lora_mode in WEIGHTS_HOLD_ADAPTER and (len(bundles) != 1 or self.admin):
            raise ProbeError(
                f"--lora-mode {self.lora_mode} serves exactly one bundle (its adapter is in the weights); "
                "several bundles, or --admin, need --lora-mode adapter"
            )
        admin_loras = ADMIN_MIN_LORAS if self.admin else 1
        admin_rank = ADMIN_MIN_LORA_RANK if self.admin else 1
        max_loras = self.max_loras or max(admin_loras, len(bundles))
        return EngineConfig(
            model=self.model,
            adapter=bundles[0].adapter_path if self.lora_mode == "merged" else None,
            lora_rank=self.max_lora_rank or max(admin_rank, *(b.lora_rank for b in bundles)),
            max_loras=max_loras,
            specialize_active_lora=(
                specialize_by_default(max_loras, self.enforce_eager)
                if self.specialize_active_lora is None
                else self.specialize_active_lora
            ),
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


async def _set_health(servicer: HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(config: ServeConfig) -> None:
    """Refuse what must not run: an open admin service, clashing names, an unknown default."""
    if config.admin and not config.auth_tokens and not _is_loopback(config.host):
        raise ProbeError(
            f"--admin without auth would let anyone who reaches {config.host} load bundles: "
            "give --auth-token-file (or PROBESERVE_AUTH_TOKEN), or listen on a loopback address"
        )
    if not config.bundles:
        raise ProbeError("no bundle to serve: give --bundle")


def _read_bundles(config: ServeConfig) -> list[tuple[str, Bundle]]:
    """Read every start-up bundle and run its static pairing checks, the default one first."""
    pairing = Pairing(config.model, config.precision, config.skip_pairing_check, config.lora_mode)
    named = [read_bundle(spec, pairing) for spec in config.bundles]
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ProbeError(f"two bundles are named {repeated[0]!r}: name them with --bundle NAME=PATH")
    if config.default_bundle and config.default_bundle not in names:
        raise ProbeError(f"--default-bundle {config.default_bundle!r} is none of {', '.join(names)}")
    default = config.default_bundle or names[0]
    return sorted(named, key=lambda item: item[0] != default)


async def check_pairing(config: ServeConfig, keep_going: bool = False) -> dict[str, list[Check]]:
    """Every pairing check of every bundle, as ``serve`` runs them, without a gRPC server.

    A failed static check ends it (as it ends ``serve``) unless ``keep_going``: then the engine
    checks run too, to show how far from the source the model answers.
    """
    results: dict[str, list[Check]] = {}
    bundles: list[tuple[str, Bundle]] = []
    for spec in config.bundles:
        name, bundle = read_bundle(spec, Pairing(config.model, config.precision, skip=True))
        results[name] = static_checks(bundle, config.model, config.precision, lora_mode=config.lora_mode)
        bundles.append((name, bundle))
    if not keep_going and any(not c.passed for checks in results.values() for c in checks):
        return results
    engine = await asyncio.to_thread(start_engine, config.engine_config([b for _, b in bundles]))
    try:
        tokenizer = HfPieceTokenizer.from_pretrained(config.model)
        for name, bundle in bundles:
            adapter = None
            if config.lora_mode == "adapter":
                adapter = await engine.add_adapter(name, bundle.adapter_path, bundle.lora_rank)
            extractor = Extractor(bundle, tokenizer, bind(engine, adapter))
            results[name] += await function_checks(
                bundle, extractor.prompts, extractor.engine, config.precision
            )
        return results
    finally:
        engine.shutdown()


def _log_failed(exc: PairingError) -> None:
    check = exc.check
    log.error(
        "pairing_failed", check=check.name, measured=check.measured, threshold=check.threshold,
        detail=check.detail, action="not serving; --skip-pairing-check overrides (not advised)",
    )  # fmt: skip


async def _watch_engine(engine: ServingEngine, health: HealthServicer, state: ServingState) -> None:
    """Turn health NOT_SERVING as soon as the engine is found dead."""
    while not engine.errored:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
    log.error("engine_dead", action="health NOT_SERVING; calls get UNAVAILABLE")
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)


def _build_server(
    config: ServeConfig, state: ServingState
) -> tuple[grpc.aio.Server, HealthServicer, AdminServicer | None, int]:
    interceptors = []
    if config.auth_tokens:
        denied = state.metrics.calls

        def count_denied(method: str) -> None:
            denied.labels(method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()

        interceptors.append(BearerTokenInterceptor(config.auth_tokens, on_denied=count_denied))
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", HARD_MESSAGE_CAP),
        ("grpc.max_send_message_length", HARD_MESSAGE_CAP),
    ]
    if config.max_connection_age_s:
        age_ms = int(config.max_connection_age_s * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    pb_grpc.add_ProbeServiceServicer_to_server(ProbeServicer(state, config.limits), server)
    services = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    admin = None
    if config.admin:
        admin = AdminServicer(state)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        services.append(ADMIN_SERVICE_NAME)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        port = server.add_secure_port(address, config.tls.credentials())
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, health_servicer, admin, port


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
    check_config(config)
    tokenizer = HfPieceTokenizer.from_pretrained(config.model)
    state = ServingState(
        model=str(config.model), precision=config.precision, log_utterances=config.log_utterances
    )
    if config.log_utterances:
        log.warning("logging_utterances", note="utterance text goes into the logs (--log-utterances)")
    server, health_servicer, admin, port = _build_server(config, state)
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = state.metrics.serve(config.metrics_host, config.metrics_port)
    log.info(
        "listening", address=f"{config.host}:{port}", tls=config.tls is not None,
        auth=bool(config.auth_tokens), admin=config.admin, metrics_port=metrics_port,
        bundles=[str(spec.path) for spec in config.bundles], health="NOT_SERVING",
    )  # fmt: skip

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine: ServingEngine | None = None
    watchdog: asyncio.Task[None] | None = None
    try:
        bundles = _read_bundles(config)  # static pairing checks: before the engine starts
        engine_config = config.engine_config([b for _, b in bundles])
        engine_task = asyncio.create_task(asyncio.to_thread(start_engine, engine_config))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({engine_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not engine_task.done():
            log.info("stopped_before_ready")
            engine = await engine_task
            return
        engine = engine_task.result()
        live_engine = engine
        state.metrics.watch_engine(live_engine.unfinished_requests, lambda: not live_engine.errored)
        pairing = Pairing(config.model, config.precision, config.skip_pairing_check, config.lora_mode)
        in_weights = engine_config.lora_mode in WEIGHTS_HOLD_ADAPTER
        loader = BundleLoader(state.registry, engine, tokenizer, pairing, adapter_in_weights=in_weights)
        for name, bundle in bundles:
            await loader.attach(name, bundle)
        state.engine_version = engine_version()
        state.max_prompt_tokens = engine.max_prompt_tokens
        state.ready = True
        if admin is not None:
            admin.loader = loader
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        watchdog = asyncio.create_task(_watch_engine(engine, health_servicer, state))
        log.info(
            "serving", address=f"{config.host}:{port}", bundles=[e.name for e in state.registry.entries()],
            default_bundle=state.registry.default_name, startup_s=round(time.perf_counter() - started, 1),
        )  # fmt: skip
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
        state.ready = False
        state.registry.clear()
        if engine is not None:
            engine.shutdown()
        log.info("stopped", drain_s=drained_s, total_s=round(time.perf_counter() - drain_started, 2))
