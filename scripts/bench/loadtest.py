"""Load test of a probeserve server through the real async client: throughput, latency, errors.

Two ways to load it:

- closed loop (``--concurrency N``, the default with N=1): N calls in flight; each worker sends
  its next call when its last one returns, so the server sets the pace;
- open loop (``--rate R``): calls arrive at Poisson times, R a second on average, whatever the
  server does. An arrival that finds ``--max-outstanding`` calls in flight is dropped (counted,
  not sent); one sent more than ``--late-ms`` after its scheduled time (the client fell behind)
  is counted late. Latency counts from the scheduled time, so a slow client cannot hide
  queueing (no coordinated omission).

What a call is, by ``--mode``: ``unary``, one Extract; ``batch``, one ExtractBatch of
``--batch-size`` items; ``stream``, one item on a long-lived ExtractStream (reopened if it
fails), answered in order. Latencies go into an HdrHistogram (1 us .. 1 h, 3 significant
digits). ``--warmup`` calls go first and are not counted. The run stops issuing calls at
``--duration`` seconds or ``--requests`` calls (open loop: arrivals), whichever comes first,
then waits for the calls in flight. Errors are counted by gRPC status code, per item (a failed
call fails all its items; a batch or stream item can also fail alone) and per call. Calls are
not retried (the client's retries are off).

    python scripts/bench/loadtest.py --target 127.0.0.1:50051 --concurrency 8 --duration 30
    python scripts/bench/loadtest.py --target HOST:PORT --rate 5 --max-outstanding 32 --mode stream
    python scripts/bench/loadtest.py --spawn --precision fp32 --concurrency 4 -- --max-num-seqs 8

Utterances come from ``--inputs`` (JSONL, ``{"function", "utterance"}`` a line) or else the demo
bundle's validation split, used in turn. ``--spawn`` starts ``probeserve serve`` itself
(``--bundle``/``--model``/``--precision``; arguments after ``--`` go to the server) and stops it
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from common import Utterance, load_inputs
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from probeserve_client import AsyncProbeClient, AsyncResultStream, ExtractItem, ProbeServeError

HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_DIGITS = 3
MISMATCH = "MISMATCHED_RESPONSE"  # a stream answer whose request id is not the one expected next

# A call: send these items under this request id; returns each item's error code name, or
# None where it got an extraction. Raises ProbeServeError when the call as a whole fails.
Caller = Callable[[Sequence[Utterance], str], Awaitable[list[str | None]]]


@dataclass
class Tally:
    """What one phase of the run sent and got back."""

    histogram: HdrHistogram = field(
        default_factory=lambda: HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)
    )
    calls_sent: int = 0
    calls_ok: int = 0
    calls_failed: int = 0
    items_sent: int = 0
    items_ok: int = 0
    items_failed: int = 0
    item_errors: Counter[str] = field(default_factory=Counter)
    call_errors: Counter[str] = field(default_factory=Counter)
    # Open loop only.
    scheduled: int = 0
    dropped: int = 0
    late: int = 0

    def sent(self, n_items: int) -> None:
        self.calls_sent += 1
        self.items_sent += n_items

    def answered(self, codes: Sequence[str | None], latency_s: float) -> None:
        self.calls_ok += 1
        self.histogram.record_value(max(HIST_LOWEST_US, min(HIST_HIGHEST_US, round(latency_s * 1e6))))
        for code in codes:
            if code is None:
                self.items_ok += 1
            else:
                self.items_failed += 1
                self.item_errors[code] += 1

    def failed(self, n_items: int, code: str) -> None:
        self.calls_failed += 1
        self.call_errors[code] += 1
        self.items_failed += n_items
        self.item_errors[code] += n_items


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
    """The utterances in turn, ``per_call`` at a time, with a fresh request id per call."""

    def __init__(self, utterances: Sequence[Utterance], per_call: int, prefix: str) -> None:
        self._cycle = itertools.cycle(utterances)
        self._per_call = per_call
        self._ids = itertools.count()
        self._prefix = prefix

    def next(self) -> tuple[list[Utterance], str]:
        return [next(self._cycle) for _ in range(self._per_call)], f"{self._prefix}-{next(self._ids)}"


class _StreamSession:
    """One ExtractStream: items are fed through a queue; answers resolve futures in order."""

    def __init__(self, client: AsyncProbeClient, timeout_s: float | None) -> None:
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

    def __init__(self, client: AsyncProbeClient, timeout_s: float | None) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._session: _StreamSession | None = None

    async def __call__(self, items: Sequence[Utterance], request_id: str) -> list[str | None]:
        if self._session is None or self._session.dead:
            self._session = _StreamSession(self._client, self._timeout_s)
        item = items[0]
        return [await self._session.submit(ExtractItem(item.function, item.utterance, request_id))]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def unary_caller(client: AsyncProbeClient) -> Caller:
    async def call(items: Sequence[Utterance], request_id: str) -> list[str | None]:
        item = items[0]
        result = await client.extract(item.function, item.utterance, request_id=request_id)
        return [None if result.request_id == request_id else MISMATCH]

    return call


def batch_caller(client: AsyncProbeClient) -> Caller:
    async def call(items: Sequence[Utterance], request_id: str) -> list[str | None]:
        ids = [f"{request_id}.{i}" for i in range(len(items))]
        batch = [ExtractItem(u.function, u.utterance, rid) for u, rid in zip(items, ids, strict=True)]
        results = await client.extract_batch(batch)
        if [r.request_id for r in results] != ids:
            return [MISMATCH] * len(items)
        return [None if r.error is None else r.error.code.name for r in results]

    return call


async def _one_call(caller: Caller, inputs: Inputs, tally: Tally, started: float) -> None:
    items, request_id = inputs.next()
    tally.sent(len(items))
    try:
        codes = await caller(items, request_id)
    except ProbeServeError as error:
        tally.failed(len(items), error.code.name)
        return
    tally.answered(codes, time.perf_counter() - started)


async def closed_loop(caller: Caller, inputs: Inputs, budget: Budget, concurrency: int, tally: Tally) -> None:
    async def worker() -> None:
        while budget.take():
            await _one_call(caller, inputs, tally, time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_loop(
    caller: Caller,
    inputs: Inputs,
    budget: Budget,
    *,
    rate: float,
    max_outstanding: int,
    late_s: float,
    seed: int,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    in_flight: set[asyncio.Task[None]] = set()
    scheduled = time.perf_counter()
    while True:
        scheduled += rng.expovariate(rate)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if scheduled >= budget.deadline or not budget.take():
            break
        tally.scheduled += 1
        if len(in_flight) >= max_outstanding:
            tally.dropped += 1
            continue
        if time.perf_counter() - scheduled > late_s:
            tally.late += 1
        task = asyncio.create_task(_one_call(caller, inputs, tally, scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


def _percentiles_ms(histogram: HdrHistogram) -> dict[str, float | int | None]:
    count = int(histogram.get_total_count())
    if count == 0:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "min": None, "mean": None}
    ms = {q: round(histogram.get_value_at_percentile(q) / 1e3, 3) for q in (50, 90, 99)}
    return {
        "count": count,
        "p50": ms[50],
        "p90": ms[90],
        "p99": ms[99],
        "max": round(histogram.get_max_value() / 1e3, 3),
        "min": round(histogram.get_min_value() / 1e3, 3),
        "mean": round(histogram.get_mean_value() / 1e3, 3),
    }


async def run(args: argparse.Namespace, target: str, utterances: Sequence[Utterance]) -> dict[str, Any]:
    """Warm up, then run the measured phase; returns the report."""
    metadata = (("authorization", f"Bearer {args.auth_token}"),) if args.auth_token else ()
    credentials = None
    options: list[tuple[str, Any]] = []
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    per_call = args.batch_size if args.mode == "batch" else 1
    stream_deadline = args.duration + args.timeout + 60 if args.mode == "stream" else None
    async with AsyncProbeClient(
        target, timeout=args.timeout, metadata=metadata, credentials=credentials, retries=0, options=options
    ) as client:
        info = await client.info()

        def make_caller() -> tuple[Caller, StreamCaller | None]:
            if args.mode == "unary":
                return unary_caller(client), None
            if args.mode == "batch":
                return batch_caller(client), None
            stream = StreamCaller(client, stream_deadline)
            return stream, stream

        warm = Tally()
        caller, stream = make_caller()
        await closed_loop(
            caller,
            Inputs(utterances, per_call, "warm"),
            Budget(args.warmup, float("inf")),
            args.concurrency,
            warm,
        )
        if stream is not None:
            await stream.close()

        tally = Tally()
        caller, stream = make_caller()
        inputs = Inputs(utterances, per_call, "load")
        started = time.perf_counter()
        budget = Budget(args.requests, started + args.duration)
        if args.rate:
            await open_loop(
                caller,
                inputs,
                budget,
                rate=args.rate,
                max_outstanding=args.max_outstanding,
                late_s=args.late_ms / 1e3,
                seed=args.seed,
                tally=tally,
            )
        else:
            await closed_loop(caller, inputs, budget, args.concurrency, tally)
        elapsed = time.perf_counter() - started
        if stream is not None:
            await stream.close()

    return {
        "target": target,
        "mode": args.mode,
        "loop": "open" if args.rate else "closed",
        "concurrency": None if args.rate else args.concurrency,
        "rate_per_s": args.rate or None,
        "max_outstanding": args.max_outstanding if args.rate else None,
        "batch_size": per_call,
        "server": {"model": info.model, "precision": info.precision, "engine": info.engine_version},
        "inputs": {
            "source": str(args.inputs) if args.inputs else "validation split",
            "count": len(utterances),
        },
        "limits": {"duration_s": args.duration, "requests": args.requests},
        "warmup": {"calls": warm.calls_sent, "failed_calls": warm.calls_failed},
        "elapsed_s": round(elapsed, 3),
        "calls": {"sent": tally.calls_sent, "ok": tally.calls_ok, "failed": tally.calls_failed},
        "items": {"sent": tally.items_sent, "ok": tally.items_ok, "failed": tally.items_failed},
        "open_loop": (
            {
                "scheduled": tally.scheduled,
                "sent": tally.calls_sent,
                "dropped": tally.dropped,
                "late": tally.late,
            }
            if args.rate
            else None
        ),
        "throughput": {
            "items_per_s": round(tally.items_ok / elapsed, 3) if elapsed > 0 else 0.0,
            "calls_per_s": round(tally.calls_ok / elapsed, 3) if elapsed > 0 else 0.0,
        },
        "latency_ms": _percentiles_ms(tally.histogram),
        "errors_by_code": dict(sorted(tally.item_errors.items())),
        "call_errors_by_code": dict(sorted(tally.call_errors.items())),
        "hdr_histogram_us": tally.histogram.encode().decode("ascii") if tally.calls_ok else None,
    }


def summary(report: dict[str, Any]) -> str:
    loop = (
        f"open loop, {report['rate_per_s']}/s Poisson, at most {report['max_outstanding']} outstanding"
        if report["loop"] == "open"
        else f"closed loop, concurrency {report['concurrency']}"
    )
    calls, items, rate, lat = report["calls"], report["items"], report["throughput"], report["latency_ms"]
    mode = f"batch of {report['batch_size']}" if report["mode"] == "batch" else report["mode"]
    lines = [
        f"probeserve load test: {mode}, {loop}, {report['elapsed_s']} s against {report['target']}",
        f"calls: {calls['sent']} sent, {calls['ok']} ok, {calls['failed']} failed;"
        f" items: {items['sent']} sent, {items['ok']} ok, {items['failed']} failed",
        f"throughput: {rate['items_per_s']} items/s, {rate['calls_per_s']} calls/s",
        f"latency ms (per call, {lat['count']} ok): p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
        f"max {lat['max']}",
    ]
    if report["open_loop"]:
        o = report["open_loop"]
        lines.append(f"arrivals: {o['scheduled']} scheduled, {o['dropped']} dropped, {o['late']} late")
    errors = ", ".join(f"{code} {n}" for code, n in report["errors_by_code"].items())
    lines.append(f"errors (items): {errors or 'none'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Arguments after -- go to `probeserve serve` (with --spawn).",
    )
    where = parser.add_argument_group("server")
    where.add_argument("--target", help="host:port of a running server")
    where.add_argument("--spawn", action="store_true", help="start a server for the run, stop it after")
    where.add_argument("--bundle", type=Path, help="with --spawn (default: the demo bundle)")
    where.add_argument("--model", type=Path, help="with --spawn (default: the demo model)")
    where.add_argument("--precision", default="auto", help="with --spawn")
    where.add_argument(
        "--auth-token", default=os.environ.get("PROBESERVE_AUTH_TOKEN"),
        help="bearer token (default: $PROBESERVE_AUTH_TOKEN); with --spawn the server accepts it",
    )  # fmt: skip
    where.add_argument("--tls-ca", type=Path, help="CA certificate (PEM): connect with TLS")
    where.add_argument("--tls-server-name", help="name the server's certificate is for, if not the target's")
    load = parser.add_argument_group("load")
    load.add_argument("--mode", choices=["unary", "batch", "stream"], default="unary")
    load.add_argument("--batch-size", type=int, default=8, help="items per ExtractBatch (--mode batch)")
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: calls in flight")
    load.add_argument("--rate", type=float, help="open loop: mean arrivals per second (Poisson)")
    load.add_argument("--max-outstanding", type=int, default=64, help="open loop: more in flight are dropped")
    load.add_argument("--late-ms", type=float, default=10.0, help="open loop: sent this late counts as late")
    load.add_argument("--duration", type=float, default=30.0, help="seconds to issue calls for")
    load.add_argument("--requests", type=int, help="calls (open loop: arrivals) to issue at most")
    load.add_argument("--warmup", type=int, default=5, help="calls sent first and not counted")
    load.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds")
    load.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival times")
    data = parser.add_argument_group("data and output")
    data.add_argument(
        "--inputs", type=Path, help="JSONL, {function, utterance} a line (default: validation split)"
    )
    data.add_argument("--data", type=Path, help="data directory of the validation split")
    data.add_argument("--out", type=Path, help="write the report here as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.target) == args.spawn:
        parser.error("give exactly one of --target and --spawn")
    if server_args and not args.spawn:
        parser.error("arguments after -- need --spawn")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if min(args.concurrency, args.batch_size, args.max_outstanding) < 1:
        parser.error("--concurrency, --batch-size and --max-outstanding must be at least 1")
    utterances = load_inputs(args.inputs, args.data)

    if not args.spawn:
        report = asyncio.run(run(args, args.target, utterances))
    else:
        from probeserve.cli import DEMO_BUNDLE, DEMO_MODEL
        from probeserve.launcher import start_server

        env = os.environ.copy()
        if args.auth_token:
            env["PROBESERVE_AUTH_TOKEN"] = args.auth_token
        client_kwargs: dict[str, Any] = {}
        if args.tls_ca:
            client_kwargs["credentials"] = grpc.ssl_channel_credentials(args.tls_ca.read_bytes())
            if args.tls_server_name:
                client_kwargs["options"] = [("grpc.ssl_target_name_override", args.tls_server_name)]
        with tempfile.TemporaryDirectory() as tmp:
            server = start_server(
                bundle=args.bundle or DEMO_BUNDLE,
                model=args.model or DEMO_MODEL,
                precision=args.precision,
                log_path=Path(tmp) / "server.log",
                extra_args=tuple(server_args),
                env=env,
                client_kwargs=client_kwargs,
            )
            try:
                report = asyncio.run(run(args, server.target, utterances))
            finally:
                code = server.stop()
            report["spawned_server"] = {"startup_s": round(server.startup_s, 1), "exit_code": code}
    print(summary(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
