"""An in-process engine: vLLM's synchronous ``LLMEngine`` driven by one dedicated thread.

The default engine (:class:`probeserve.engines.config.VllmEngine`) runs vLLM's engine core in a child
process, so every request's float32 ``[T, d]`` hidden states cross processes (about 1 MiB per
60-token prompt at d=4096). Here the engine core lives in the server process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): on an H200 that saved about 5 ms at batch 1 and 15 ms
at batch 8 (shared/gpu/README.md).

One thread owns the engine for its whole life: it builds it, takes new requests and aborts from
a thread-safe queue, ``add_request()``\\ s them, ``step()``\\ s while work is unfinished and hands
each finished request's result to its asyncio future with ``loop.call_soon_threadsafe``. A request
may bring a *reader* (``read_states``): right after each step the thread hands the reader the
hidden states of every request that step finished, in one call, so the probe heads run once per
step for the whole batch, beside the engine (on its GPU), and the event loop receives only their
decisions. Requests that arrive while a step runs join the next one, so concurrent calls
batch as in ``AsyncLLM``.

A pooling request finishes in the step that admits it, so when a burst of calls trickles in
over the network the first arrivals would start a small step of their own and the rest would
wait for it: a closed loop of 8 clients splits into groups that take turns. ``batch_wait_ms``
lets an idle engine wait (a bounded time) until as many requests are queued as its last step
answered, which keeps such a burst in one step; a lone caller never waits.
Each request carries its bundle's adapter, so requests of several bundles share a step (vLLM's
multi-LoRA). Adding, removing and listing adapters are commands too: the thread runs them between
steps, as it must, since the engine core is not thread-safe.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
import torch

from probeserve.core.errors import EngineUnavailableError, ProbeError
from probeserve.core.extraction import BatchReader
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

# How long the idle engine thread sleeps on its queue before it looks at the stop flag again.
# A new request wakes it at once; this only bounds how late it notices shutdown.
IDLE_WAIT_S = 0.05

C = TypeVar("C")
R = TypeVar("R")


@dataclass
class _Add:
    engine_id: str
    token_ids: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    reader: BatchReader[Any, Any] | None = None  # None: the hidden states themselves
    context: Any = None  # the reader's item for this request
    adapter: Adapter | None = None


@dataclass
class _Abort:
    engine_id: str


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread, between steps (adapter management)."""

    fn: Callable[[Any], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class _Wake:
    """Sent by shutdown so that an idle thread notices the stop flag at once."""


_Command = _Add | _Abort | _Call | _Wake


def _settle(future: asyncio.Future[Any], outcome: object) -> None:
    """Runs on the future's event loop."""
    if future.done():  # cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _post(command: _Add | _Call, outcome: object) -> None:
    """Hand a request's outcome to its caller's event loop (from the engine thread)."""
    with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
        command.loop.call_soon_threadsafe(_settle, command.future, outcome)


class InlineEngine:
    """Hidden states of prompts from an in-process vLLM ``LLMEngine``, each under its request's adapter."""

    def __init__(self, config: EngineConfig, kwargs: dict[str, Any]) -> None:
        self.config = config
        self._kwargs = kwargs
        self._engine: Any = None
        self._params: Any = None
        self._ids = AdapterIds(config)
        self._max_model_len = 0
        self._tensor_parallel_size = 0
        self._hidden_size = 0
        self._queue: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._pending: dict[str, _Add] = {}  # the engine thread's alone
        self._request_numbers = itertools.count()
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
        prepare_environment(config)
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
            tensor_parallel_size=engine._tensor_parallel_size,  # as vLLM reports it
            compiled=not config.enforce_eager,
            max_loras=engine._kwargs.get("max_loras", 0),  # 0: no LoRA in the engine (merged, premerged)
            specialize_active_lora=engine._kwargs.get("specialize_active_lora", False),
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

    async def hidden_states(
        self, request_id: str, token_ids: list[int], adapter: Adapter | None
    ) -> torch.Tensor:
        hidden: torch.Tensor = await self._submit(request_id, token_ids, adapter)
        return hidden

    async def read_states(
        self,
        request_id: str,
        token_ids: list[int],
        reader: BatchReader[C, R],
        context: C,
        adapter: Adapter | None,
    ) -> R:
        """This request's item of ``reader([(states, context), ...])``, which the engine thread
        calls once per step for every request of that step with the same reader."""
        result: R = await self._submit(request_id, token_ids, adapter, reader, context)
        return result

    async def add_adapter(self, name: str, path: Path, rank: int) -> Adapter:
        async def add_lora(request: Any) -> bool:
            return bool(await self._call(lambda engine: engine.add_lora(request)))

        return await self._ids.load(name, path, rank, add_lora)

    async def remove_adapter(self, adapter: Adapter) -> None:
        await self._call(lambda engine: engine.remove_lora(adapter.lora_id))

    async def adapter_ids(self) -> set[int]:
        ids: set[int] = set(await self._call(lambda engine: engine.list_loras()))
        return ids

    async def _call(self, fn: Callable[[Any], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._put(_Call(fn, loop, future))
        return await future

    def _put(self, command: _Command) -> None:
        with self._submit_lock:
            if self._closed or self._errored:
                raise EngineUnavailableError("the inference engine has stopped")
            self._queue.put(command)

    async def _submit(
        self,
        request_id: str,
        token_ids: list[int],
        adapter: Adapter | None,
        reader: BatchReader[Any, Any] | None = None,
        context: Any = None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # Unique within the engine even when callers reuse a request id.
        engine_id = f"{request_id}-{next(self._request_numbers)}"
        command = _Add(engine_id, token_ids, loop, future, reader, context, adapter)
        self._put(command)
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
        self._tensor_parallel_size = int(self._engine.vllm_config.parallel_config.tensor_parallel_size)
        self._params = pooling_params()

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
        last_step = 0  # requests the last step answered; 0 after an idle spell
        arrived = 0  # requests that came while it ran, before its answers went out
        while not self._stop.is_set():
            if not engine.has_unfinished_requests():
                try:
                    command = self._queue.get(timeout=IDLE_WAIT_S)
                except queue.Empty:
                    last_step = arrived = 0
                    continue
                self._drain(command)
            # The callers of the last step, and those that came meanwhile, are likely to be back.
            expected = min(last_step + arrived, self.config.max_num_seqs)
            if len(self._pending) < expected:
                self._gather(expected)
            if self._stop.is_set():
                return
            if engine.has_unfinished_requests():
                finished = [output for output in engine.step() if output.finished]
                arrived = self._drain(None)  # counted before any answer goes out
                self._finish(finished)
                last_step = len(finished)

    def _drain(self, command: _Command | None) -> int:
        """Handle ``command`` and whatever else is queued, without waiting; returns how many
        requests were added."""
        added = 0
        while True:
            if command is not None:
                added += self._handle(command)
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                return added

    def _gather(self, expected: int) -> None:
        """Wait up to ``batch_wait_ms`` until ``expected`` requests are pending (see the module doc)."""
        if self.config.batch_wait_ms <= 0:
            return
        deadline = time.perf_counter() + self.config.batch_wait_ms / 1e3
        while len(self._pending) < expected and not self._stop.is_set():
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                command = self._queue.get(timeout=left)
            except queue.Empty:
                return
            self._drain(command)

    def _handle(self, command: _Command) -> int:
        """Carry out one command; returns 1 if it added a request to the engine, else 0."""
        if isinstance(command, _Add):
            if command.future.done():  # cancelled before it reached the engine
                return 0
            try:
                self._engine.add_request(
                    command.engine_id,
                    {"prompt_token_ids": command.token_ids},
                    self._params,
                    lora_request=command.adapter.lora_request if command.adapter else None,
                )
            except Exception as exc:  # a request the engine refuses (too long, ...)
                _post(command, ProbeError(f"engine request failed: {exc}"))
                return 0
            self._pending[command.engine_id] = command
            return 1
        if isinstance(command, _Abort) and self._pending.pop(command.engine_id, None) is not None:
            self._engine.abort_request([command.engine_id])
        if isinstance(command, _Call) and not command.future.done():
            try:
                outcome = command.fn(self._engine)
            except Exception as exc:  # the caller's to handle, not the engine's
                outcome = exc
            _post(command, outcome)
        return 0

    def _finish(self, outputs: list[Any]) -> None:
        """Hand each finished request its result: its states, or its item of its reader's call
        (one call per reader for the whole step)."""
        batches: dict[BatchReader[Any, Any], list[tuple[_Add, torch.Tensor]]] = {}
        for output in outputs:
            command = self._pending.pop(str(output.request_id), None)
            if command is None:  # aborted meanwhile
                continue
            if getattr(output, "error", None):  # vLLM 0.32 reports a failed request here; 0.26 has no field
                _post(command, ProbeError(f"engine request failed: {output.error}"))
                continue
            data: torch.Tensor = output.outputs.data
            if command.reader is None:
                _post(command, data if data.device.type == "cpu" else data.cpu())
            else:
                batches.setdefault(command.reader, []).append((command, data))
        for reader, batch in batches.items():
            try:
                results: Sequence[object] = reader([(data, command.context) for command, data in batch])
                if len(results) != len(batch):
                    raise ProbeError(f"reader returned {len(results)} results for {len(batch)} requests")
            except Exception as exc:  # the reader's error is its callers', not the engine's
                results = [exc] * len(batch)
            for (command, _), outcome in zip(batch, results, strict=True):
                _post(command, outcome)

    def _close(self, error: EngineUnavailableError) -> None:
        """Take no more commands and fail every request still waiting, queued or in the engine."""
        with self._submit_lock:
            self._closed = True
        waiting: list[_Add | _Call] = list(self._pending.values())
        self._pending.clear()
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add | _Call):
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
