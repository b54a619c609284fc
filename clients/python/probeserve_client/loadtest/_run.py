"""Putting load on a server through the async client, and counting what came of every call.

Two ways to pace it:

- closed loop (``concurrency`` N): N calls in flight; each worker sends its next call when its
  last one returns, so the server sets the pace;
- open loop (``rate`` R): calls arrive at Poisson times, R a second on average, whatever the
  server does. An arrival that finds ``max_outstanding`` calls in flight is dropped (counted,
  never sent); one sent more than ``late_ms`` after its scheduled time (the client fell behind)
  is counted late. Latency counts from the scheduled time, so a slow client cannot hide queueing
  (no coordinated omission).

A call is, by ``mode``: ``unary``, one Extract; ``batch``, one ExtractBatch of ``batch_size``
items; ``stream``, one item on a long-lived ExtractStream (reopened if it fails), answered in
order. Calls are not retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from probeserve_client._client import AsyncProbeClient, AsyncResultStream
from probeserve_client._errors import ProbeServeError
from probeserve_client._types import ExtractItem

MODES = ("unary", "batch", "stream")
MISMATCH = "MISMATCHED_RESPONSE"  # an answer whose request id is not the one its item was sent with
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_DIGITS = 3

# A call: send these items (ids set); returns each item's error code name, or None where it got
# an extraction. Raises ProbeServeError when the call as a whole fails.
Caller = Callable[[Sequence[ExtractItem]], Awaitable[list[str | None]]]


@dataclass(frozen=True)
class LoadSettings:
    """What load to put on the server, and when to stop (times in seconds unless named)."""

    mode: str = "unary"
    batch_size: int = 8
    concurrency: int = 1  # closed loop
    rate: float | None = None  # open loop when set: mean arrivals per second
    max_outstanding: int = 64  # open loop: arrivals beyond this many in flight are dropped
    late_ms: float = 10.0  # open loop: sent this late counts as late
    duration_s: float = 30.0
    requests: int | None = None  # calls (open loop: arrivals) at most
    warmup: int = 5  # calls sent first, closed loop, not counted
    timeout_s: float = 30.0  # deadline of each call (a stream's: the whole run's)
    seed: int = 0  # open loop: the arrival times
    bundle: str = ""  # sent with every item when set

    @property
    def per_call(self) -> int:
        return self.batch_size if self.mode == "batch" else 1

    @property
    def loop(self) -> str:
        return "open" if self.rate else "closed"

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if min(self.concurrency, self.batch_size, self.max_outstanding) < 1:
            raise ValueError("concurrency, batch size and max outstanding must be at least 1")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError("duration and timeout must be positive")
        if self.warmup < 0 or (self.requests is not None and self.requests < 1):
            raise ValueError("warmup must be at least 0 and requests at least 1")


def new_histogram() -> Any:
    """An HdrHistogram of microseconds (1 us .. 1 h, 3 significant digits): the loadtest extra."""
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


@dataclass
class Second:
    """What happened in one second of the run: arrivals and drops by arrival, answers and errors
    by when they came."""

    latencies_ms: list[float] = field(default_factory=list)
    offered: int = 0
    items_answered: int = 0
    errors: int = 0
    dropped: int = 0


class Recorder:
    """Counts of one phase of the run, by call and by item, and its latencies.

    Calls: ``offered`` = ``dropped`` + ``sent``; ``sent`` = ``answered`` + ``errors`` +
    calls still in flight (none once the run has waited for them). Items likewise; a batch or
    stream item can fail alone while its call is answered.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.histogram = new_histogram()
        self.calls: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.item_errors: Counter[str] = Counter()
        self.call_errors: Counter[str] = Counter()
        self.in_band_errors: Counter[str] = Counter()  # items that failed inside an answered call
        self.late = 0
        self.seconds: dict[int, Second] = {}

    def _second(self, at: float) -> Second:
        index = max(0, int(at - self.started))
        return self.seconds.setdefault(index, Second())

    @property
    def in_flight(self) -> int:
        return self.calls["sent"] - self.calls["answered"] - self.calls["errors"]

    def offered(self, n_items: int, at: float) -> None:
        self.calls["offered"] += 1
        self.items["offered"] += n_items
        self._second(at).offered += 1

    def dropped(self, n_items: int, at: float) -> None:
        self.calls["dropped"] += 1
        self.items["dropped"] += n_items
        self._second(at).dropped += 1

    def sent(self, n_items: int) -> None:
        self.calls["sent"] += 1
        self.items["sent"] += n_items

    def answered(self, codes: Sequence[str | None], latency_s: float, at: float) -> None:
        self.calls["answered"] += 1
        self.histogram.record_value(max(HIST_LOWEST_US, min(HIST_HIGHEST_US, round(latency_s * 1e6))))
        second = self._second(at)
        second.latencies_ms.append(latency_s * 1e3)
        for code in codes:
            if code is None:
                self.items["answered"] += 1
                second.items_answered += 1
            else:
                self.items["errors"] += 1
                self.item_errors[code] += 1
                self.in_band_errors[code] += 1

    def failed(self, n_items: int, code: str, at: float) -> None:
        self.calls["errors"] += 1
        self.call_errors[code] += 1
        self.items["errors"] += n_items
        self.item_errors[code] += n_items
        self._second(at).errors += 1


class Budget:
    """Hands out calls until ``requests`` have been taken or the deadline has passed."""

    def __init__(self, requests: int | None, deadline: float) -> None:
        self.requests = requests
        self.deadline = deadline
        self.taken = 0

    def take(self) -> bool:
        if self.requests is not None and self.taken >= self.requests:
            return False
        if time.perf_counter() >= self.deadline:
            return False
        self.taken += 1
        return True


class Inputs:
    """The items in turn, ``per_call`` at a time, each with a fresh request id."""

    def __init__(self, items: Sequence[ExtractItem], per_call: int, prefix: str, bundle: str) -> None:
        self._cycle = itertools.cycle(items)
        self._per_call = per_call
        self._ids = itertools.count()
        self._prefix = prefix
        self._bundle = bundle

    def next(self) -> list[ExtractItem]:
        call = f"{self._prefix}-{next(self._ids)}"
        ids = [call] if self._per_call == 1 else [f"{call}.{i}" for i in range(self._per_call)]
        chosen = []
        for request_id in ids:
            item = next(self._cycle)
            chosen.append(
                dataclasses.replace(item, request_id=request_id, bundle=self._bundle or item.bundle)
            )
        return chosen


class _StreamSession:
    """One ExtractStream: items are fed through a queue; answers resolve futures in order."""

    def __init__(self, client: AsyncProbeClient, timeout_s: float) -> None:
        self._queue: asyncio.Queue[ExtractItem | None] = asyncio.Queue()
        self._pending: deque[tuple[str, asyncio.Future[str | None]]] = deque()
        self.dead = False
        self._stream: AsyncResultStream = client.stream(self._requests(), timeout=timeout_s)
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[ExtractItem]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def submit(self, item: ExtractItem) -> str | None:
        if self.dead:
            raise ProbeServeError(grpc.StatusCode.UNAVAILABLE, "stream closed")
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending.append((item.request_id, future))
        self._queue.put_nowait(item)
        return await future

    async def _read(self) -> None:
        error: ProbeServeError
        try:
            async for result in self._stream:
                request_id, future = self._pending.popleft()
                code = None if result.error is None else result.error.code.name
                future.set_result(MISMATCH if result.request_id != request_id else code)
            error = ProbeServeError(grpc.StatusCode.UNKNOWN, "stream ended before answering every item")
        except ProbeServeError as exc:
            error = exc
        self.dead = True
        self._queue.put_nowait(None)
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._reader, 30)
        except TimeoutError:
            self._stream.cancel()
            self._reader.cancel()


class StreamCaller:
    """Calls as items of one long-lived stream; a new stream is opened when one fails."""

    def __init__(self, client: AsyncProbeClient, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._session: _StreamSession | None = None

    async def __call__(self, items: Sequence[ExtractItem]) -> list[str | None]:
        if self._session is None or self._session.dead:
            self._session = _StreamSession(self._client, self._timeout_s)
        return [await self._session.submit(items[0])]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def unary_caller(client: AsyncProbeClient) -> Caller:
    async def call(items: Sequence[ExtractItem]) -> list[str | None]:
        item = items[0]
        result = await client.extract(
            item.function, item.utterance, request_id=item.request_id, bundle=item.bundle
        )
        return [None if result.request_id == item.request_id else MISMATCH]

    return call


def batch_caller(client: AsyncProbeClient) -> Caller:
    async def call(items: Sequence[ExtractItem]) -> list[str | None]:
        results = await client.extract_batch(items)
        if [r.request_id for r in results] != [i.request_id for i in items]:
            return [MISMATCH] * len(items)
        return [None if r.error is None else r.error.code.name for r in results]

    return call


async def _one_call(caller: Caller, inputs: Inputs, recorder: Recorder, started: float) -> None:
    items = inputs.next()
    recorder.sent(len(items))
    try:
        codes = await caller(items)
    except ProbeServeError as error:
        recorder.failed(len(items), error.code.name, time.perf_counter())
        return
    now = time.perf_counter()
    recorder.answered(codes, now - started, now)


async def closed_loop(
    caller: Caller, inputs: Inputs, budget: Budget, concurrency: int, recorder: Recorder, per_call: int
) -> None:
    async def worker() -> None:
        while budget.take():
            now = time.perf_counter()
            recorder.offered(per_call, now)
            await _one_call(caller, inputs, recorder, now)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_loop(
    caller: Caller, inputs: Inputs, budget: Budget, settings: LoadSettings, recorder: Recorder
) -> None:
    assert settings.rate is not None
    rng = random.Random(settings.seed)
    in_flight: set[asyncio.Task[None]] = set()
    scheduled = time.perf_counter()
    while True:
        scheduled += rng.expovariate(settings.rate)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if scheduled >= budget.deadline or not budget.take():
            break
        recorder.offered(settings.per_call, scheduled)
        if len(in_flight) >= settings.max_outstanding:
            recorder.dropped(settings.per_call, scheduled)
            continue
        if time.perf_counter() - scheduled > settings.late_ms / 1e3:
            recorder.late += 1
        task = asyncio.create_task(_one_call(caller, inputs, recorder, scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


@dataclass
class LoadRun:
    """What :func:`run_load` measured: the warm-up's and the measured phase's recorders."""

    warmup: Recorder
    measured: Recorder
    elapsed_s: float


async def run_load(
    client: AsyncProbeClient,
    settings: LoadSettings,
    items: Sequence[ExtractItem],
    *,
    on_progress: Callable[[Recorder, float], None] | None = None,
    progress_every_s: float = 1.0,
) -> LoadRun:
    """Warm up, then put the load on; ``on_progress(recorder, elapsed_s)`` is called every
    ``progress_every_s`` meanwhile. Returns once every call has ended."""
    settings.check()
    if not items:
        raise ValueError("no items to send")

    def make_caller() -> tuple[Caller, StreamCaller | None]:
        if settings.mode == "unary":
            return unary_caller(client), None
        if settings.mode == "batch":
            return batch_caller(client), None
        stream = StreamCaller(client, settings.duration_s + settings.timeout_s + 60)
        return stream, stream

    warm = Recorder(time.perf_counter())
    caller, stream = make_caller()
    warm_inputs = Inputs(items, settings.per_call, "warm", settings.bundle)
    warm_budget = Budget(settings.warmup, float("inf"))
    await closed_loop(caller, warm_inputs, warm_budget, settings.concurrency, warm, settings.per_call)
    if stream is not None:
        await stream.close()

    caller, stream = make_caller()
    inputs = Inputs(items, settings.per_call, "load", settings.bundle)
    started = time.perf_counter()
    recorder = Recorder(started)
    budget = Budget(settings.requests, started + settings.duration_s)

    async def report_progress() -> None:
        assert on_progress is not None
        while True:
            await asyncio.sleep(progress_every_s)
            on_progress(recorder, time.perf_counter() - started)

    progress = asyncio.create_task(report_progress()) if on_progress is not None else None
    try:
        if settings.rate:
            await open_loop(caller, inputs, budget, settings, recorder)
        else:
            await closed_loop(caller, inputs, budget, settings.concurrency, recorder, settings.per_call)
        elapsed = time.perf_counter() - started
        if stream is not None:
            await stream.close()
    finally:
        if progress is not None:
            progress.cancel()
    return LoadRun(warm, recorder, elapsed)
