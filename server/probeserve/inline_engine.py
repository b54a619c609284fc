"""An in-process engine: vLLM's synchronous ``LLMEngine`` driven by one dedicated thread.

The default engine (:class:`probeserve.engine.VllmEngine`) runs vLLM's engine core in a child
process, so every request's float32 ``[T, d]`` hidden states cross processes (about 1 MiB per
60-token prompt at d=4096). Here the engine core lives in the server process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): on an H200 that saved about 5 ms at batch 1 and 15 ms
at batch 8 (shared/gpu/README.md).

One thread owns the engine for its whole life: it builds it, takes new requests and aborts from
a thread-safe queue, ``add_request()``\\ s them, ``step()``\\ s while work is unfinished and hands
each finished request's states to its asyncio future with ``loop.call_soon_threadsafe``. Requests
that arrive while a step runs join the next one, so concurrent calls batch as in ``AsyncLLM``.
A cancelled coroutine aborts its request; an engine exception marks the engine errored and fails
every waiter with :class:`EngineUnavailableError`. The interface is that of ``VllmEngine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from probeserve.engine import (
    ENGINE_SHUTDOWN_TIMEOUT_S,
    EngineConfig,
    _prepare_environment,
    engine_kwargs,
    lora_request,
    pooling_params,
)
from probeserve.errors import EngineUnavailableError, ProbeError

log = structlog.get_logger(__name__)

# How long the idle engine thread sleeps on its queue before it looks at the stop flag again.
# A new request wakes it at once; this only bounds how late it notices shutdown.
IDLE_WAIT_S = 0.05


@dataclass
class _Add:
    engine_id: str
    token_ids: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[torch.Tensor]


@dataclass
class _Abort:
    engine_id: str


class _Wake:
    """Sent by shutdown so that an idle thread notices the stop flag at once."""


_Command = _Add | _Abort | _Wake


def _settle(future: asyncio.Future[torch.Tensor], outcome: torch.Tensor | BaseException) -> None:
    """Runs on the future's event loop."""
    if future.done():  # cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _post(command: _Add, outcome: torch.Tensor | BaseException) -> None:
    """Hand a request's outcome to its caller's event loop (from the engine thread)."""
    with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
        command.loop.call_soon_threadsafe(_settle, command.future, outcome)


class InlineEngine:
    """Hidden states of prompts from an in-process vLLM ``LLMEngine`` with one LoRA adapter applied."""

    def __init__(self, config: EngineConfig, kwargs: dict[str, Any]) -> None:
        self.config = config
        self._kwargs = kwargs
        self._engine: Any = None
        self._params: Any = None
        self._lora: Any = None
        self._max_model_len = 0
        self._hidden_size = 0
        self._queue: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._pending: dict[str, _Add] = {}  # the engine thread's alone
        self._ids = itertools.count()
        self._submit_lock = threading.Lock()
        self._closed = False  # under _submit_lock: no more commands are taken
        self._errored = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="probeserve-engine", daemon=True)

    @classmethod
    def start(cls, config: EngineConfig) -> InlineEngine:
        """Build the engine on its own thread and wait until it is ready (or failed to start)."""
        _prepare_environment()
        # In-process engine core: read by vLLM when the engine is built, so set it first.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine = cls(config, engine_kwargs(config))
        engine._thread.start()
        engine._ready.wait()
        if engine._start_error is not None:
            engine._thread.join(ENGINE_SHUTDOWN_TIMEOUT_S)
            raise engine._start_error
        log.info(
            "engine_started", model=engine._kwargs["model"], precision=config.precision,
            lora_mode=config.lora_mode, max_model_len=engine._max_model_len, engine="inline",
        )  # fmt: skip
        return engine

    # -- the interface of VllmEngine -----------------------------------------------------------

    @property
    def max_prompt_tokens(self) -> int:
        return self._max_model_len

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def errored(self) -> bool:
        return self._errored or self._closed

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (aborted ones leave this count)."""
        engine = self._engine
        if engine is None or self._closed:
            return 0
        return int(engine.get_num_unfinished_requests())

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        # Unique within the engine even when callers reuse a request id.
        command = _Add(f"{request_id}-{next(self._ids)}", token_ids, loop, future)
        with self._submit_lock:
            if self._closed or self._errored:
                raise EngineUnavailableError("the inference engine has stopped")
            self._queue.put(command)
        try:
            return await future
        except asyncio.CancelledError:
            self._queue.put(_Abort(command.engine_id))
            raise

    def shutdown(self) -> None:
        """Stop the engine thread (it fails what is still waiting and stops the engine core)."""
        self._stop.set()
        self._queue.put(_Wake())
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(ENGINE_SHUTDOWN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("engine_thread_still_running", waited_s=ENGINE_SHUTDOWN_TIMEOUT_S)

    # -- the engine thread ---------------------------------------------------------------------

    def _build(self) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        args = EngineArgs(**self._kwargs)
        self._engine = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
        model_config = self._engine.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._hidden_size = int(model_config.get_hidden_size())
        self._params = pooling_params()
        # No adapter slots in the engine (a merged adapter): requests go without a LoRARequest.
        self._lora = lora_request(self.config) if self._kwargs.get("enable_lora") else None

    def _run(self) -> None:
        try:
            self._build()
        except BaseException as exc:
            self._start_error = exc
            self._closed = True
            self._ready.set()
            return
        self._ready.set()
        failure: BaseException | None = None
        try:
            self._serve()
        except BaseException as exc:
            failure = exc
            self._errored = True
            log.error("engine_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            why = "the inference engine has stopped"
            self._close(EngineUnavailableError(f"{why}: {failure}" if failure else why))
            self._stop_core()

    def _serve(self) -> None:
        engine = self._engine
        while not self._stop.is_set():
            busy = bool(engine.has_unfinished_requests())
            try:
                command = self._queue.get(block=not busy, timeout=None if busy else IDLE_WAIT_S)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self._queue.get_nowait()
                except queue.Empty:
                    command = None
            if self._stop.is_set():
                return
            if engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        self._finish(output)

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Add):
            if command.future.done():  # cancelled before it reached the engine
                return
            try:
                self._engine.add_request(
                    command.engine_id,
                    {"prompt_token_ids": command.token_ids},
                    self._params,
                    lora_request=self._lora,
                )
            except Exception as exc:  # a request the engine refuses (too long, ...)
                _post(command, ProbeError(f"engine request failed: {exc}"))
                return
            self._pending[command.engine_id] = command
        elif isinstance(command, _Abort) and self._pending.pop(command.engine_id, None) is not None:
            self._engine.abort_request([command.engine_id])

    def _finish(self, output: Any) -> None:
        command = self._pending.pop(str(output.request_id), None)
        if command is None:  # aborted meanwhile
            return
        if getattr(output, "error", None):  # vLLM 0.32 reports a failed request here; 0.26 has no field
            _post(command, ProbeError(f"engine request failed: {output.error}"))
            return
        data: torch.Tensor = output.outputs.data
        _post(command, data if data.device.type == "cpu" else data.cpu())

    def _close(self, error: EngineUnavailableError) -> None:
        """Take no more commands and fail every request still waiting, queued or in the engine."""
        with self._submit_lock:
            self._closed = True
        waiting = list(self._pending.values())
        self._pending.clear()
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                waiting.append(command)
        for command in waiting:
            _post(command, error)

    def _stop_core(self) -> None:
        engine, self._engine = self._engine, None
        core = getattr(engine, "engine_core", None)
        if core is None:
            return
        started = time.perf_counter()
        try:
            core.shutdown()
        except Exception as exc:
            log.warning("engine_shutdown_failed", error=f"{type(exc).__name__}: {exc}")
        log.info("engine_stopped", engine="inline", shutdown_s=round(time.perf_counter() - started, 2))
