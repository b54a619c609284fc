"""What both engine adapters share: how an engine is configured and what vLLM is asked for.

Both adapters run vLLM with the pooling runner and the ``token_embed`` task, so each request
returns the final-norm hidden state of every prompt token. Pooled states are never normalised
(``use_activation=False``): the NullHead was trained on raw states and its bias flips decisions
on unit vectors. Each bundle's LoRA adapter is registered with the engine as an :class:`Adapter`
and travels with each of its requests as a ``LoRARequest`` (vLLM's multi-LoRA batches requests
for different adapters in one step), unless a single bundle's adapter is merged into the weights.
``ServingEngine`` is what the transport needs of either adapter; :func:`bind` gives the view of
it with one bundle's adapter that the extraction pipeline and the pairing check read through.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
import torch

from probeserve.core.checkpoint import quantization as checkpoint_quantization
from probeserve.core.errors import ErrorKind, ProbeError
from probeserve.core.extraction import BatchReader, HiddenStateEngine

log = structlog.get_logger(__name__)

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# AWQ: 4-bit weights, 16-bit activations (the checkpoint's quantization config is read by vLLM).
QUANTIZED_PRECISIONS = ("awq",)
PRECISIONS = (*PRECISION_DTYPES, *QUANTIZED_PRECISIONS)
LORA_MODES = ("adapter", "merged", "premerged")
# No LoRA in the engine: the one bundle's adapter merged here, or already folded into the
# checkpoint by its quantizer (scripts/quantize_awq.py --merge-adapter).
WEIGHTS_HOLD_ADAPTER = ("merged", "premerged")
# vLLM-CPU reserves most of the machine's memory for its KV cache unless told otherwise; the
# prompts here are short, so a small cache is plenty.
DEFAULT_CPU_KVCACHE_GIB = "1"
ENGINE_SHUTDOWN_TIMEOUT_S = 20.0
# Token counts that CUDA graphs are captured for when compiled (not enforce_eager). vLLM's default
# stops at twice max_num_seqs (32 tokens at 16), shorter than one ~60-token prompt, so every
# request would run without a graph (H200: 18.5 ms against 13.0 ms with these sizes); batches
# in between are padded up to the next size.
CUDA_GRAPH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Inline engine: how long an idle engine may wait to keep a burst in one step. On the H200, 8
# gRPC clients' calls arrive 3-5 ms apart; 2 ms still split them (BENCHMARKS.md, GPU).
DEFAULT_BATCH_WAIT_MS = 5.0
# What `probeserve serve` starts with no tuning flags: the fastest configuration measured on both
# kinds of device, the inline engine, compiled (BENCHMARKS.md, "Defaults"; scripts/bench/defaults.py).
# CPU (bf16, demo model, one run): p50 1.01x vLLM's own compiled LLM.encode, against 1.24x for
# the process engine eager; H200: inline + compiled was the fastest configuration measured.
DEFAULT_EAGER = False
DEFAULT_ENGINE = "inline"
ENGINE_KINDS = ("process", "inline")


def specialize_by_default(max_loras: int, enforce_eager: bool) -> bool:
    """Whether an engine asks vLLM for ``specialize_active_lora`` unless told: for CUDA graphs of
    an engine with slots for more than one adapter. On an H200 (8B shape, eight bundles, load
    over all eight, concurrency 8) it took the cost of mixing adapters from 1.09/1.14 (two runs)
    to a median of 1.08 over seven (1.04-1.13), and an engine sized for eight adapters but serving
    one from 3-5% to ~0% (BENCHMARKS.md, "several bundles"). vLLM reads it only in its GPU LoRA
    kernels and graph dispatch, so elsewhere it would only cost start-up."""
    return max_loras > 1 and not enforce_eager and torch.cuda.is_available()


@dataclass(frozen=True)
class EngineConfig:
    """How to start the engine."""

    model: Path
    # lora_mode "merged": the one adapter merged into the weights. "adapter": unused; adapters
    # are registered while the engine runs (ServingEngine.add_adapter).
    adapter: Path | None
    # The largest LoRA rank an adapter may have (vLLM sizes its adapter slots for it at start).
    lora_rank: int
    precision: str = "bf16"
    # "adapter": each request carries its bundle's adapter; "merged": the one bundle's adapter is
    # merged into the base weights once (probeserve.engines.merge, cached and verified) and the
    # engine runs without LoRA.
    lora_mode: str = "adapter"
    # Distinct adapters one engine step may mix (vLLM's max_loras). More may be registered: vLLM
    # keeps at most max(max_loras, MIN_CPU_LORAS) of them in memory and reloads others on use.
    max_loras: int = 1
    # CUDA graphs per count of active adapters (1, 2, 4, ... up to max_loras: vLLM's
    # specialize_active_lora) rather than one graph whose LoRA kernels cover every slot
    # (specialize_by_default says when the server turns it on).
    specialize_active_lora: bool = False
    # In-process engine driven by one thread (probeserve.engines.inline) instead of vLLM's
    # engine-core process: no hidden states cross a process boundary.
    inline: bool = DEFAULT_ENGINE == "inline"
    # Inline engine only: when the engine is idle and fewer requests are waiting than its last
    # step answered, wait up to this long for the rest before the next step (0: never wait).
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shape (benchmarks)
    max_model_len: int = 512
    max_num_seqs: int = 16
    enforce_eager: bool = DEFAULT_EAGER
    gpu_memory_utilization: float = 0.5
    # Shards of the model across devices (vLLM's tensor parallelism): the pooled hidden states of
    # every prompt come back whole from rank 0, in either engine kind.
    tensor_parallel_size: int = 1
    seed: int = 0


def prepare_environment(config: EngineConfig) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # The engine core is a child process; forking a process that runs gRPC threads is unsafe.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if config.tensor_parallel_size > 1 and not torch.cuda.is_available():
        bind = cpu_thread_binding(sorted(os.sched_getaffinity(0)), config.tensor_parallel_size)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    if config.tensor_parallel_size > 1 and torch.cuda.is_available() and multicast_disabled():
        # vLLM's symmetric-memory all-reduce (on by default) rendezvouses through PyTorch's
        # multicast at start-up and only then finds it off; where the host forbids multicast it
        # is not started at all. The TP workers read this variable, and inherit it.
        os.environ.setdefault("VLLM_ALLREDUCE_USE_SYMM_MEM", "0")


def cpu_thread_binding(cpus: list[int], ranks: int) -> str:
    """vLLM-CPU's ``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` workers: the allowed CPUs cut into
    that many contiguous groups. Its automatic binding gives each rank a NUMA node of its own and
    refuses to start tensor parallelism on a machine with fewer nodes than ranks."""
    if ranks > len(cpus):
        raise ProbeError(f"tensor parallelism over {ranks} CPU workers needs as many CPUs, not {len(cpus)}")
    size, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        stop = start + size + (rank < extra)
        groups.append(",".join(str(cpu) for cpu in cpus[start:stop]))
        start = stop
    return "|".join(groups)


def resolve_precision(precision: str, model: Path | None = None) -> str:
    """``auto``: ``awq`` for a 4-bit checkpoint; else bf16 on GPUs and CPUs with native bf16, else fp32.

    Without native bf16 (seen here on an AMD EPYC without AVX-512), vLLM-CPU at bf16 took
    2.2 s per request on the demo model against 1.0 s at fp32 (scripts/bench/latency.py). A quantized
    checkpoint only runs as ``awq`` and ``awq`` only runs a quantized checkpoint.
    """
    quantized = checkpoint_quantization(model) if model is not None else None
    if precision == "auto":
        if quantized:
            return quantized
        return "bf16" if _native_bf16() else "fp32"
    if model is not None and precision in QUANTIZED_PRECISIONS and quantized is None:
        raise ProbeError(f"--precision {precision} needs a 4-bit AWQ checkpoint; {model} is not quantized")
    if model is not None and precision in PRECISION_DTYPES and quantized is not None:
        raise ProbeError(f"{model} is a 4-bit {quantized} checkpoint; serve it with --precision {quantized}")
    return precision


def _native_bf16() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def engine_version() -> str:
    import vllm

    return f"vllm {vllm.__version__}"


# Adapters vLLM keeps loaded in host memory (its max_cpu_loras): beyond max_loras, so that the
# adapters of several bundles are not reloaded from disk as requests alternate between them.
MIN_CPU_LORAS = 16


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts a fixed set of maximum LoRA ranks; take the smallest that fits."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    raise ProbeError(f"LoRA rank {rank} exceeds what vLLM supports (512)")


def activation_dtype(precision: str) -> str:
    """The engine's ``dtype``: the precision's own, or for AWQ the 16-bit activation format."""
    if precision in PRECISION_DTYPES:
        return PRECISION_DTYPES[precision]
    if precision == "awq":
        return "float16" if torch.cuda.is_available() else "bfloat16"
    raise ProbeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def engine_kwargs(config: EngineConfig) -> dict[str, Any]:
    """The vLLM ``EngineArgs``/``AsyncEngineArgs`` keyword arguments for a config.

    With ``lora_mode="merged"`` the model is the merged checkpoint (made and verified once,
    then cached) and LoRA is off in the engine.
    """
    from vllm.config import PoolerConfig

    if config.lora_mode not in LORA_MODES:
        raise ProbeError(f"unknown LoRA mode {config.lora_mode!r}; choose one of {', '.join(LORA_MODES)}")
    merged = config.lora_mode in WEIGHTS_HOLD_ADAPTER  # no LoRA in the engine
    dummy = config.load_format == "dummy"
    if config.lora_mode == "merged" and config.precision in QUANTIZED_PRECISIONS and not dummy:
        raise ProbeError("an adapter cannot be merged into quantized weights; use lora_mode='adapter'")
    model = str(config.model)
    if config.lora_mode == "merged" and config.adapter is None and not dummy:
        raise ProbeError("lora_mode='merged' needs the adapter to merge")
    if merged and dummy:
        log.warning("merge_skipped", why="dummy weights: no LoRA in the engine, the cost of a merged adapter")
    elif config.lora_mode == "merged":
        from probeserve.engines.merge import merged_checkpoint

        assert config.adapter is not None  # checked above
        model = str(merged_checkpoint(config.model, config.adapter, PRECISION_DTYPES[config.precision]))
    kwargs: dict[str, Any] = {
        "model": model,
        "runner": "pooling",
        "pooler_config": PoolerConfig(task="token_embed", use_activation=False),
        "dtype": activation_dtype(config.precision),
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": max(config.max_model_len, 2048),
        "enforce_eager": config.enforce_eager,
        "enable_prefix_caching": False,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "tensor_parallel_size": config.tensor_parallel_size,
        "seed": config.seed,
        "load_format": config.load_format,
    }
    if not merged:
        kwargs.update(
            enable_lora=True,
            max_loras=config.max_loras,
            max_cpu_loras=max(config.max_loras, MIN_CPU_LORAS),
            max_lora_rank=_lora_rank_slot(config.lora_rank),
            specialize_active_lora=config.specialize_active_lora,
        )
    sizes = [size for size in CUDA_GRAPH_SIZES if size <= kwargs["max_num_batched_tokens"]]
    if sizes and not config.enforce_eager and torch.cuda.is_available():
        kwargs["cudagraph_capture_sizes"] = sizes
    if config.tensor_parallel_size > 1 and torch.cuda.is_available() and multicast_disabled():
        # vLLM fuses each TP all-reduce with the next RMSNorm through FlashInfer (on by default at
        # TP > 1 on Hopper and Blackwell), whose workspace comes from PyTorch's symmetric memory,
        # with multicast; where the host turns multicast off that workspace has none, FlashInfer
        # does not check, and its kernels fault (vLLM 0.26 on two H200s: "illegal memory access").
        # So keep the plain all-reduce (NCCL and vLLM's custom one, point to point).
        kwargs["compilation_config"] = {"pass_config": {"fuse_allreduce_rms": False}}
        log.info("allreduce_fusion_off", why="NVLink multicast is disabled on this host")
    return kwargs


def multicast_disabled() -> bool:
    """Whether the environment turns NVLink multicast off (NCCL, PyTorch symmetric memory, NVSHMEM)."""
    env = os.environ
    return (
        env.get("NCCL_NVLS_ENABLE") == "0"
        or env.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1"
        or env.get("NVSHMEM_DISABLE_NVLS") == "1"
    )


def pooling_params() -> Any:
    """Per-token final hidden states, never normalised."""
    from vllm import PoolingParams

    return PoolingParams(task="token_embed", use_activation=False)


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter registered with the engine; vLLM knows it by ``lora_id``."""

    name: str
    lora_id: int
    path: Path
    rank: int

    @functools.cached_property
    def lora_request(self) -> Any:
        """vLLM's request object for it, made once: it goes with every request of its bundle."""
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.lora_id, str(self.path))


class AdapterIds:
    """Numbers adapters for one engine and checks that it can take them."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._ids = itertools.count(1)

    def new(self, name: str, path: Path, rank: int) -> Adapter:
        config = self._config
        if config.lora_mode != "adapter":
            raise ProbeError(
                f"this engine runs one bundle's adapter in its weights (--lora-mode {config.lora_mode}), "
                "so it cannot take another adapter; serve several bundles with --lora-mode adapter",
                ErrorKind.FAILED_PRECONDITION,
            )
        slot = _lora_rank_slot(config.lora_rank)
        if rank > slot:
            raise ProbeError(
                f"adapter {name!r} has LoRA rank {rank}; this engine was started for ranks up to "
                f"{slot} (--max-lora-rank)",
                ErrorKind.FAILED_PRECONDITION,
            )
        return Adapter(name, next(self._ids), path, rank)

    async def load(
        self, name: str, path: Path, rank: int, add_lora: Callable[[Any], Awaitable[bool]]
    ) -> Adapter:
        """A new adapter, loaded by ``add_lora(lora_request)`` (vLLM's, on the engine's terms)."""
        adapter = self.new(name, path, rank)
        try:
            added = await add_lora(adapter.lora_request)
        except ProbeError:
            raise
        except Exception as exc:
            raise ProbeError(f"the engine cannot load adapter {path}: {exc}") from exc
        if not added:
            raise ProbeError(f"the engine did not load adapter {path}")
        return adapter


class ServingEngine(Protocol):
    """What the server needs from an engine: hidden states under an adapter, the adapters it
    holds, health, and a way to stop it."""

    @property
    def max_prompt_tokens(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def errored(self) -> bool: ...

    def unfinished_requests(self) -> int: ...

    async def hidden_states(
        self, request_id: str, token_ids: list[int], adapter: Adapter | None
    ) -> torch.Tensor: ...

    async def add_adapter(self, name: str, path: Path, rank: int) -> Adapter:
        """Register and load an adapter (a broken one fails here, not on its first request)."""
        ...

    async def remove_adapter(self, adapter: Adapter) -> None:
        """Unload an adapter; call only once no request uses it."""
        ...

    async def adapter_ids(self) -> set[int]:
        """The ids of the adapters the engine holds, as vLLM lists them."""
        ...

    def shutdown(self) -> None: ...


C = TypeVar("C")
R = TypeVar("R")


class _Bound:
    """An engine seen through one adapter (None: the weights alone, or a merged adapter)."""

    def __init__(self, engine: ServingEngine, adapter: Adapter | None) -> None:
        self.engine = engine
        self.adapter = adapter

    @property
    def max_prompt_tokens(self) -> int:
        return self.engine.max_prompt_tokens

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        return await self.engine.hidden_states(request_id, token_ids, self.adapter)


class _BoundInPlace(_Bound):
    """Likewise, for an engine that runs a reader where it makes the states (ReadsInPlace)."""

    async def read_states(
        self, request_id: str, token_ids: list[int], reader: BatchReader[C, R], context: C
    ) -> R:
        result: R = await self.engine.read_states(  # type: ignore[attr-defined]
            request_id, token_ids, reader, context, self.adapter
        )
        return result


def bind(engine: ServingEngine, adapter: Adapter | None) -> HiddenStateEngine:
    """The engine as one bundle's pipeline and pairing check see it: every request under ``adapter``."""
    if hasattr(engine, "read_states"):
        return _BoundInPlace(engine, adapter)
    return _Bound(engine, adapter)
