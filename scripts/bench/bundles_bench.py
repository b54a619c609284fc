"""What serving several bundles on one model costs: p50 with requests spread over 1, 2 and 8 bundles.

    python scripts/bench/gpu/make_bundle.py ROOT --bundles 8          # the 8B shape and 8 bundles
    python scripts/bench/bundles_bench.py --root ROOT --out OUT       # GPU: fp16, compiled
    python scripts/bench/gpu/make_bundle.py ROOT --small --bundles 8  # a CPU dry run:
    python scripts/bench/bundles_bench.py --root ROOT --out OUT --precision fp32 --eager -n 40

Real servers (``probeserve serve --load-format dummy --skip-pairing-check --lora-mode adapter``),
all up at once on the one GPU and measured in turn through the real client over loopback gRPC,
so that the drift of a GPU host between runs hits them alike (``--servers``; the first three by
default):

- ``one``: one bundle, its adapter per request (``max_loras`` 1): the baseline;
- ``two``: two bundles, the load on one of them and spread over both;
- ``eight``: eight bundles with adapters and heads of their own (``max_loras`` 8), and the load
  spread evenly (request k asks bundle k mod N) over 1, 2 and 8 of them;
- ``one-max8``: the one bundle alone on an engine sized for eight adapters (``--max-loras 8``):
  what the engine setting costs, apart from mixing adapters in a step.

Each server's graphs are specialized for the active adapters as its own default says (on for
more than one adapter slot on a GPU) unless ``--[no-]specialize-active-lora``; the table says.
Each round measures every server and spread at every concurrency, one after another; each level
is a closed loop of C clients (threads, one channel each) at concurrency 1 and 8. Writes
OUT/bundles_bench.json and OUT/bundles_bench.md. Issue 15's target: eight bundles, load spread
over all eight, within 10% of the one-bundle server's p50.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentile
from make_bundle import UTTERANCES  # the benchmark's ~60-token prompts (common puts gpu/ on the path)

from probeserve.launcher import RunningServer, start_server
from probeserve_client import ProbeClient

BUNDLES = 8
SPREADS = (1, 2, 8)


def closed_loop(target: str, bundles: list[str], concurrency: int, n: int, warmup: int) -> list[float]:
    """``n`` requests from ``concurrency`` clients, request k to ``bundles[k % len(bundles)]``; ms each."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency)

    def client(j: int) -> None:
        with ProbeClient(target, timeout=120, retries=0) as probe:
            ks = range(j, n + warmup * concurrency, concurrency)
            try:
                start.wait(120)
                for count, k in enumerate(ks):
                    function, utterance = UTTERANCES[k % len(UTTERANCES)]
                    t0 = time.perf_counter()
                    probe.extract(function, utterance, bundle=bundles[k % len(bundles)])
                    if count >= warmup:
                        latencies[j].append((time.perf_counter() - t0) * 1e3)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(j,)) for j in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if errors:
        raise errors[0]
    return [x for per_client in latencies for x in per_client]


def _server(args: argparse.Namespace, bundles: list[Path], log: Path, max_loras: int | None) -> RunningServer:
    extra: list[str] = []
    for bundle in bundles[1:]:
        extra += ["--bundle", str(bundle)]
    extra += ["--load-format", "dummy", "--skip-pairing-check", "--lora-mode", "adapter"]
    extra += ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-num-seqs", "16"]
    if max_loras is not None:
        extra += ["--max-loras", str(max_loras)]
    if args.specialize_active_lora is not None:  # else the server's default (on where graphs mix adapters)
        extra.append(f"--{'' if args.specialize_active_lora else 'no-'}specialize-active-lora")
    if args.eager:
        extra.append("--eager")
    return start_server(
        bundle=bundles[0], model=args.root / args.model, log_path=log, precision=args.precision,
        extra_args=tuple(extra), timeout_s=args.startup_timeout_s,
    )  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    bundles = [args.root / "bundles" / f"b{i}" for i in range(BUNDLES)]
    missing = [b for b in bundles if not b.is_dir()]
    if missing:
        raise SystemExit(
            f"{missing[0]} is missing: run scripts/bench/gpu/make_bundle.py ROOT --bundles {BUNDLES}"
        )
    # name -> (bundles served, --max-loras or None for the server's own sizing, spreads measured)
    plans: dict[str, tuple[list[Path], int | None, list[int]]] = {
        "one": (bundles[:1], None, [1]),
        "one-max8": (bundles[:1], BUNDLES, [1]),
        "two": (bundles[:2], None, [1, 2]),
        "eight": (bundles, None, list(SPREADS)),
    }
    plans = {name: plan for name, plan in plans.items() if name in args.servers}
    servers: dict[str, RunningServer] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name, (served, max_loras, _) in plans.items():  # one start at a time: each profiles the GPU
            servers[name] = _server(args, served, args.out / f"server-{name}.log", max_loras)
            print(f"{name}: SERVING after {servers[name].startup_s:.1f} s", flush=True)
        samples: dict[tuple[str, int, int], list[float]] = {}
        for _ in range(args.rounds):  # rounds interleave servers and spreads: drift hits them alike
            for concurrency in args.concurrency:
                for name, (_, _, spreads) in plans.items():
                    for spread in spreads:
                        names = [f"b{i}" for i in range(spread)]
                        got = closed_loop(servers[name].target, names, concurrency, args.n, args.warmup)
                        samples.setdefault((name, spread, concurrency), []).extend(got)
        engines = {  # what each engine was started with, as its server logged it
            name: next(e for e in server.log_lines() if e.get("event") == "engine_started")
            for name, server in servers.items()
        }
        for (name, spread, concurrency), values in samples.items():
            served, max_loras, _ = plans[name]
            started = engines[name]
            rows.append({
                "server": name, "bundles_loaded": len(served), "max_loras": started["max_loras"],
                "specialize_active_lora": started["specialize_active_lora"],
                "spread_over": spread, "concurrency": concurrency, "requests": len(values),
                "p50_ms": round(percentile(values, 0.5), 2), "p90_ms": round(percentile(values, 0.9), 2),
                "p99_ms": round(percentile(values, 0.99), 2), "startup_s": round(servers[name].startup_s, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}


def report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = {(r["server"], r["concurrency"]): r["p50_ms"] for r in rows if r["spread_over"] == 1}

    def ratio(r: dict[str, Any], server: str) -> str:
        b = base.get((server, r["concurrency"]))
        return f"{r['p50_ms'] / b:.3f}" if b else "—"

    lines = [
        "| server | bundles loaded | max_loras | specialized | load spread over | concurrency | p50 ms "
        "| p90 ms | p99 ms | p50 / one | p50 / one-max8 |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(
        rows, key=lambda r: (r["concurrency"], r["bundles_loaded"], r["max_loras"], r["spread_over"])
    ):
        lines.append(
            f"| {r['server']} | {r['bundles_loaded']} | {r['max_loras']} | "
            f"{'yes' if r.get('specialize_active_lora') else 'no'} | {r['spread_over']} | "
            f"{r['concurrency']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | "
            f"{ratio(r, 'one')} | {ratio(r, 'one-max8')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="make_bundle.py's ROOT (with --bundles 8)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="llama8b", help="the model folder under ROOT")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--eager", action="store_true", help="eager engine (default: compiled, as served)")
    parser.add_argument("-n", type=int, default=200, help="measured requests per level and round")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured requests per client first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--startup-timeout-s", type=float, default=400)
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["one", "one-max8", "two", "eight"],
        default=["one", "two", "eight"],
        help="which servers to start (all at once)",
    )
    parser.add_argument(
        "--specialize-active-lora",
        action=argparse.BooleanOptionalAction,
        help="pass --[no-]specialize-active-lora to every server (default: the servers' own default, "
        "on for a compiled engine on a GPU with more than one adapter slot)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    (args.out / "bundles_bench.json").write_text(json.dumps(result, indent=1))
    table = report(result)
    (args.out / "bundles_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
