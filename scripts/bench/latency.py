"""Latency of one Extract through gRPC against the engine's own encode time, in the same run.

Starts the real server, sends N sequential Extract calls (concurrency 1) through the real
client, and pairs each call's client-side wall time with the engine time the server logged for
the same request id (the time spent inside vLLM's ``AsyncLLM.encode``, or with ``--engine inline``
until the engine thread starts the heads). The difference is what
the server adds: gRPC, tokenization, moving hidden states, head math, serialization.

    python scripts/bench/latency.py --bundle DIR --model DIR [--precision bf16] [-n 200]
    python scripts/bench/latency.py --tiny        # the tests' tiny model, made on the spot
    python scripts/bench/latency.py --tiny --engine inline
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import percentile

from probeserve.launcher import start_server
from probeserve_client import ProbeClient

UTTERANCES = [
    "Book a flight from Paris to Tokyo on March 3rd for two adults.",
    "What's the weather in Berlin tomorrow, in celsius please?",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tiny", action="store_true", help="use the tests' tiny model and bundle")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--function", help="function to call (default: the bundle's first)")
    parser.add_argument("--utterance", default=UTTERANCES[0])
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--engine", choices=["process", "inline"], default="process", help="the server's --engine"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from tests.support.tiny_model import make_all

            tiny = make_all(Path(tmp) / "tiny")
            args.bundle, args.model = tiny.bundle_dir, tiny.model_dir
        if args.bundle is None or args.model is None:
            parser.error("give --bundle and --model, or --tiny")
        server = start_server(
            bundle=args.bundle,
            model=args.model,
            precision=args.precision,
            log_path=Path(tmp) / "server.log",
            extra_args=("--engine", args.engine),
        )
        try:
            with ProbeClient(server.target, timeout=60) as client:
                function = args.function or client.info().bundles[0].functions[0].name
                for i in range(args.warmup):
                    client.extract(function, args.utterance, request_id=f"warm-{i}")
                wall: dict[str, float] = {}
                for i in range(args.n):
                    rid = f"lat-{i}"
                    t0 = time.perf_counter()
                    client.extract(function, args.utterance, request_id=rid)
                    wall[rid] = (time.perf_counter() - t0) * 1e3
            time.sleep(0.5)  # let the last log lines reach the file
            engine = {
                line["request_id"]: float(line["engine_ms"])
                for line in server.log_lines()
                if line.get("event") == "extract" and line.get("request_id") in wall
            }
        finally:
            server.stop()
    if len(engine) != len(wall):
        raise SystemExit(f"server logged {len(engine)} of {len(wall)} requests")
    overhead = [wall[r] - engine[r] for r in wall]
    result = {
        "precision": args.precision,
        "model": str(args.model),
        "n": args.n,
        "grpc_p50_ms": round(statistics.median(wall.values()), 2),
        "grpc_p90_ms": round(percentile(list(wall.values()), 0.9), 2),
        "engine_p50_ms": round(statistics.median(engine.values()), 2),
        "overhead_p50_ms": round(statistics.median(overhead), 2),
        "grpc_over_engine_p50": round(
            statistics.median(wall.values()) / statistics.median(engine.values()), 3
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
