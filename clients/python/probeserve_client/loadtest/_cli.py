"""``probeserve-client loadtest``: its options, and a run from them to the printed report."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from probeserve_client._client import AsyncProbeClient
from probeserve_client._connection import client_kwargs
from probeserve_client._inputs import read_items
from probeserve_client._types import ExtractItem
from probeserve_client.loadtest._inputs import items_from_info
from probeserve_client.loadtest._report import build_report, progress_line, summary
from probeserve_client.loadtest._run import MODES, LoadSettings, Recorder, run_load

EXTRA_HINT = "pip install 'probeserve-client[loadtest]'"
QUIET_PROGRESS_EVERY = 5  # without a terminal, a progress line every this many seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("load")
    load.add_argument("--mode", choices=MODES, default="unary", help="what a call is (default: unary)")
    load.add_argument("--batch-size", type=int, default=8, help="items per ExtractBatch (--mode batch)")
    load.add_argument("--concurrency", type=int, default=1, help="closed loop: calls in flight (default: 1)")
    load.add_argument("--rate", type=float, help="open loop: mean calls a second, Poisson arrivals")
    load.add_argument("--max-outstanding", type=int, default=64, help="open loop: more in flight are dropped")
    load.add_argument("--late-ms", type=float, default=10.0, help="open loop: sent this late counts as late")
    load.add_argument("--duration", type=float, default=30.0, help="seconds to issue calls for (default: 30)")
    load.add_argument("--requests", type=int, help="calls (open loop: arrivals) to issue at most")
    load.add_argument("--warmup", type=int, default=5, help="calls sent first and not counted (default: 5)")
    load.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrival times")
    load.add_argument("--bundle", default="", help="bundle to ask for (default: the server's default)")
    data = parser.add_argument_group("input and output")
    data.add_argument(
        "--inputs", type=Path,
        help='JSONL, {"function": ..., "utterance": ...} a line, used in turn (default: one plain '
        "utterance per function of the bundle, made from GetInfo)",
    )  # fmt: skip
    data.add_argument("--out", type=Path, help="write the report here as JSON")
    data.add_argument("--plot", type=Path, help="draw latency percentiles and throughput over time (PNG)")
    data.add_argument("--no-progress", action="store_true", help="no progress line on stderr while it runs")


def settings_from(args: argparse.Namespace) -> LoadSettings:
    return LoadSettings(
        mode=args.mode,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        rate=args.rate,
        max_outstanding=args.max_outstanding,
        late_ms=args.late_ms,
        duration_s=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        timeout_s=args.timeout,
        seed=args.seed,
        bundle=args.bundle,
    )


class Progress:
    """The progress line: rewritten in place on a terminal, else printed every few seconds."""

    def __init__(self, stream: TextIO, duration_s: float) -> None:
        self._stream = stream
        self._duration_s = duration_s
        self._tty = stream.isatty()
        self._calls = 0
        self._width = 0

    def __call__(self, recorder: Recorder, elapsed_s: float) -> None:
        self._calls += 1
        line = progress_line(recorder, elapsed_s, self._duration_s)
        if self._tty:
            self._stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif self._calls % QUIET_PROGRESS_EVERY == 0:
            self._stream.write(line + "\n")
        self._stream.flush()

    def done(self, recorder: Recorder, elapsed_s: float) -> None:
        """The final line: the run's counts once every call in flight has ended."""
        line = progress_line(recorder, elapsed_s, self._duration_s)
        self._stream.write(("\r" + line.ljust(self._width) if self._tty else line) + "\n")
        self._stream.flush()


def missing_extras(plot: bool) -> list[str]:
    """The extra's modules this run needs and cannot import."""
    wanted = ["hdrh"] + (["matplotlib"] if plot else [])
    return [name for name in wanted if importlib.util.find_spec(name) is None]


async def _load(
    args: argparse.Namespace, settings: LoadSettings, progress: Progress | None
) -> dict[str, Any]:
    kwargs = client_kwargs(args)
    async with AsyncProbeClient(args.target, retries=0, **kwargs) as client:
        info = await client.info()
        items: list[ExtractItem]
        if args.inputs:
            items, source = read_items(args.inputs), str(args.inputs)
        else:
            items = items_from_info(info, settings.bundle)
            source = f"GetInfo: one utterance per function of {settings.bundle or 'the default bundle'}"
        run = await run_load(client, settings, items, on_progress=progress)
    if progress is not None:
        progress.done(run.measured, run.elapsed_s)
    return build_report(
        target=args.target,
        settings=settings,
        server=info,
        inputs_source=source,
        inputs_count=len(items),
        run=run,
    )


def main(args: argparse.Namespace) -> int:
    """Run the load test the options describe; print the report. Returns the exit status."""
    missing = missing_extras(plot=args.plot is not None)
    if missing:
        print(f"error: the load tester needs {', '.join(missing)}: {EXTRA_HINT}", file=sys.stderr)
        return 2
    settings = settings_from(args)
    try:
        settings.check()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    progress = None if args.no_progress else Progress(sys.stderr, settings.duration_s)
    report = asyncio.run(_load(args, settings, progress))
    print(summary(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        from probeserve_client.loadtest._plot import plot

        plot(report, args.plot)
    return 0
