"""The inline engine's thread: batched readers and batch formation, over a stand-in for vLLM.

These are unit tests of the scheduling loop alone (vLLM's ``LLMEngine`` replaced by a recorder
that answers every request in the step that admits it, as the pooling runner does); the real
engine behind the same loop is exercised by test_lifecycle and scripts/bench/gpu_bench.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from probeserve.core.errors import ProbeError
from probeserve.core.extraction import BatchReader
from probeserve.engines.config import EngineConfig
from probeserve.engines.inline import InlineEngine

STEP_S = 0.02  # the stand-in's forward pass


class _Recorder:
    """Answers every added request in the next step with states [T, 2] = token id, position."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[int]] = {}
        self.steps: list[int] = []  # requests per step
        self.lock = threading.Lock()
        self.loras: dict[int, str] = {}  # lora id -> path
        self.lora_of: dict[str, int | None] = {}  # request id -> its adapter's id
        self.threads: set[str] = set()  # threads that touched the engine

    def add_request(
        self, request_id: str, prompt: dict[str, list[int]], params: Any, lora_request: Any = None
    ) -> None:
        self.threads.add(threading.current_thread().name)
        self.waiting[request_id] = prompt["prompt_token_ids"]
        self.lora_of[request_id] = lora_request.lora_int_id if lora_request else None

    def add_lora(self, lora_request: Any) -> bool:
        self.threads.add(threading.current_thread().name)
        self.loras[lora_request.lora_int_id] = lora_request.lora_path
        return True

    def remove_lora(self, lora_id: int) -> bool:
        self.threads.add(threading.current_thread().name)
        return self.loras.pop(lora_id, None) is not None

    def list_loras(self) -> set[int]:
        return set(self.loras)

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.waiting.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting)

    def step(self) -> list[Any]:
        time.sleep(STEP_S)
        batch, self.waiting = self.waiting, {}
        self.steps.append(len(batch))
        return [
            SimpleNamespace(
                request_id=rid,
                finished=True,
                outputs=SimpleNamespace(
                    data=torch.tensor([[t, i] for i, t in enumerate(ids)], dtype=torch.float32)
                ),
            )
            for rid, ids in batch.items()
        ]


class _Engine(InlineEngine):
    recorder: _Recorder

    def _build(self) -> None:
        self.recorder = self._engine = _Recorder()
        self._max_model_len, self._hidden_size = 512, 2

    def _stop_core(self) -> None:
        self._engine = None


def _start(batch_wait_ms: float) -> _Engine:
    config = EngineConfig(model=Path("unused"), adapter=None, lora_rank=16, batch_wait_ms=batch_wait_ms)
    engine = _Engine(config, {"model": "stand-in"})
    engine._thread.start()
    engine._ready.wait(10)
    return engine


@pytest.fixture
def calls() -> list[int]:
    return []


def _sum_reader(calls: list[int]) -> BatchReader[int, object]:
    def reader(items: Sequence[tuple[torch.Tensor, int]]) -> list[object]:
        calls.append(len(items))
        out: list[object] = [
            ProbeError("odd") if ctx % 2 else float(states[:, 0].sum()) + ctx for states, ctx in items
        ]
        return out

    return reader


def test_one_reader_call_per_step_with_every_request_of_it(calls: list[int]) -> None:
    engine = _start(batch_wait_ms=0)
    reader = _sum_reader(calls)

    async def main() -> list[object]:
        jobs = [engine.read_states(f"r{i}", [1, 2, 3], reader, 10 * i, None) for i in range(6)]
        jobs.append(engine.read_states("odd", [1], reader, 1, None))
        done: list[object] = await asyncio.gather(*jobs, return_exceptions=True)
        return done

    try:
        results = asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        engine.shutdown()
    assert results[:6] == [6.0 + 10 * i for i in range(6)]
    assert isinstance(results[6], ProbeError) and results[6].message == "odd"  # that caller alone
    assert sum(calls) == 7 and len(calls) == len(engine.recorder.steps)


def test_reader_failure_reaches_its_callers_and_the_engine_goes_on() -> None:
    engine = _start(batch_wait_ms=0)

    def broken(items: Sequence[tuple[torch.Tensor, None]]) -> list[object]:
        raise RuntimeError("heads failed")

    async def main() -> tuple[object, torch.Tensor]:
        failed = await asyncio.gather(
            engine.read_states("a", [1], broken, None, None), return_exceptions=True
        )
        return failed[0], await engine.hidden_states("b", [4, 5], None)

    try:
        failed, states = asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        engine.shutdown()
    assert isinstance(failed, RuntimeError) and str(failed) == "heads failed"
    assert states.tolist() == [[4.0, 0.0], [5.0, 1.0]]


async def _waves(engine: InlineEngine, clients: int, rounds: int, spread_s: float) -> None:
    """A closed loop of ``clients`` whose requests reach the engine ``spread_s`` apart."""

    async def client(k: int) -> None:
        for r in range(rounds):
            await asyncio.sleep(k * spread_s)
            await engine.hidden_states(f"c{k}-{r}", [k, r], None)

    await asyncio.gather(*(client(k) for k in range(clients)))


@pytest.mark.parametrize(("batch_wait_ms", "whole_steps"), [(0.0, False), (60.0, True)])
def test_batch_wait_keeps_a_trickling_burst_in_one_step(batch_wait_ms: float, whole_steps: bool) -> None:
    """Eight clients whose requests arrive 3 ms apart: without a wait the first arrivals start
    a step of their own and the loop splits into groups; with one, every later step holds all 8."""
    engine = _start(batch_wait_ms)
    try:
        asyncio.run(asyncio.wait_for(_waves(engine, clients=8, rounds=6, spread_s=0.003), 30))
    finally:
        engine.shutdown()
    steps = engine.recorder.steps
    assert sum(steps) == 48
    # The first request finds no history and goes alone and the rest of its wave follow (so the
    # first client runs a step ahead, and the last two steps split the same way); in between,
    # with a wait, the eight go together.
    middle = steps[2:-2]
    assert len(middle) >= 3
    assert (middle == [8] * len(middle)) is whole_steps, steps


def test_a_lone_caller_never_waits() -> None:
    """After a burst of 8, a single caller: the engine waits at most once (bounded), then its
    steps start at once. The wait is long (1 s) so that "waited" and "did not wait" stay far
    apart on a loaded machine."""
    engine = _start(batch_wait_ms=1000)

    async def main() -> list[float]:
        await _waves(engine, clients=8, rounds=2, spread_s=0.0)
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            await engine.hidden_states(f"lone-{i}", [i], None)
            times.append(time.perf_counter() - t0)
        return times

    try:
        times = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        engine.shutdown()
    assert times[0] < 1.0 + 3 * STEP_S  # the one bounded wait, for the burst's size
    assert all(t < 0.5 for t in times[1:]), times  # then it expects one request: no wait


def test_adapters_are_managed_on_the_engine_thread_and_travel_with_their_requests() -> None:
    """Two bundles' adapters: each request reaches the engine with its own adapter's id (or none),
    adapter commands run on the engine's thread between steps, and a removed one is no longer
    listed. A rank above what the engine was started for is refused before it reaches vLLM."""
    engine = _start(batch_wait_ms=0)

    async def main() -> tuple[set[int], set[int]]:
        a = await engine.add_adapter("a", Path("/bundles/a/lora_adapter"), 8)
        b = await engine.add_adapter("b", Path("/bundles/b/lora_adapter"), 16)
        with pytest.raises(ProbeError, match="rank 32") as refused:
            await engine.add_adapter("c", Path("/bundles/c/lora_adapter"), 32)
        assert refused.value.kind.name == "FAILED_PRECONDITION"
        await asyncio.gather(*(engine.hidden_states(f"q{i}", [i], (a, b, None)[i % 3]) for i in range(9)))
        both = await engine.adapter_ids()
        await engine.remove_adapter(a)
        return both, await engine.adapter_ids()

    try:
        both, after = asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        engine.shutdown()
    recorder = engine.recorder
    assert both == {1, 2} and after == {2}
    by_request = {rid.split("-")[0]: lora for rid, lora in recorder.lora_of.items()}
    assert by_request == {f"q{i}": (1, 2, None)[i % 3] for i in range(9)}
    assert recorder.threads == {"probeserve-engine"}
