"""What `probeserve serve` with no tuning flags costs against vLLM's own in-process ``encode``.

Question: is the default server fast, or only the configuration an operator tuned? One run
measures, one process at a time and in the order given, on one prompt (the demo bundle's prompt
for ``--utterance``, built as the server builds it):

- ``vllm-encode``: vLLM's ``LLM.encode`` (``token_embed``, no activation) with vLLM's own defaults
  (compiled), on the checkpoint the server runs (the adapter merged into the weights at full
  precision) at the precision the server resolves; ``vllm-encode-eager`` the same, eager;
- ``server:FLAGS``: ``probeserve serve FLAGS`` (``server:`` alone is the default) through the real
  sync client over loopback, one call at a time.

Each reports its p50/p90 over ``-n`` calls after ``--warmup``, and its start-up time (process
start to the first answer for the engine; to SERVING for the server, pairing check included).
Ratios are against the first ``vllm-encode*`` entry. Timings on these machines are noisy: compare
ratios within one run, never across runs.

    python scripts/bench/defaults.py                                  # the question above
    python scripts/bench/defaults.py --configs vllm-encode,server:,server:--eager,\\
        server:--engine=inline,server:--engine=inline --eager -n 60 --out defaults.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, percentile

from probeserve.cli import DEMO_BUNDLE, DEMO_MODEL
from probeserve.launcher import start_server

UTTERANCE = "A car starts at 12 m/s and speeds up at 3 m/s² — how fast is it after 9 seconds?"
FUNCTION = "final_velocity"
DEFAULT_CONFIGS = "vllm-encode,server:"


def summary(times_ms: list[float], startup_s: float) -> dict[str, Any]:
    return {
        "p50_ms": round(statistics.median(times_ms), 2),
        "p90_ms": round(percentile(times_ms, 0.9), 2),
        "min_ms": round(min(times_ms), 2),
        "n": len(times_ms),
        "startup_s": round(startup_s, 1),
    }


def prompt_ids(args: argparse.Namespace) -> list[int]:
    from probeserve.core.bundle import load_bundle
    from probeserve.core.prompt import PromptBuilder
    from probeserve.core.tokenization import HfPieceTokenizer

    builder = PromptBuilder.for_bundle(HfPieceTokenizer.from_pretrained(args.model), load_bundle(args.bundle))
    return builder.build(args.function, args.utterance).token_ids


def measure_encode(args: argparse.Namespace, eager: bool) -> dict[str, Any]:
    """vLLM alone, in this (child) process: what the server's engine could do at best."""
    began = time.perf_counter()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM
    from vllm.config import PoolerConfig

    from probeserve.engines.config import PRECISION_DTYPES, resolve_precision
    from probeserve.engines.merge import merged_checkpoint

    precision = resolve_precision("auto", args.model)
    dtype = PRECISION_DTYPES[precision]
    model = merged_checkpoint(args.model, args.bundle / "lora_adapter", dtype)
    kwargs: dict[str, Any] = {
        "model": str(model), "runner": "pooling", "dtype": dtype, "max_model_len": 512,
        "enable_prefix_caching": False, "enforce_eager": eager,
        "pooler_config": PoolerConfig(task="token_embed", use_activation=False),
    }  # fmt: skip
    llm = LLM(**kwargs)
    prompt: Any = [{"prompt_token_ids": prompt_ids(args)}]
    llm.encode(prompt, pooling_task="token_embed", use_tqdm=False)
    startup_s = time.perf_counter() - began
    for _ in range(args.warmup):
        llm.encode(prompt, pooling_task="token_embed", use_tqdm=False)
    times = []
    for _ in range(args.n):
        t0 = time.perf_counter()
        llm.encode(prompt, pooling_task="token_embed", use_tqdm=False)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"precision": precision, "prompt_tokens": len(prompt[0]["prompt_token_ids"])} | summary(
        times, startup_s
    )


def measure_server(args: argparse.Namespace, flags: list[str], log_dir: Path) -> dict[str, Any]:
    """The real server process, as `probeserve serve FLAGS` starts it, through the real client."""
    from probeserve_client import ProbeClient

    began = time.perf_counter()
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", "_".join(flags).replace("-", "")) or "default"  # paths too
    server = start_server(
        bundle=args.bundle, model=args.model, log_path=log_dir / f"server-{name}.log",
        extra_args=tuple(flags), timeout_s=1800,
    )  # fmt: skip
    startup_s = time.perf_counter() - began
    try:
        with ProbeClient(server.target, timeout=120) as client:
            for _ in range(args.warmup):
                client.extract(args.function, args.utterance)
            times = []
            for _ in range(args.n):
                t0 = time.perf_counter()
                client.extract(args.function, args.utterance)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        server.stop()
    return summary(times, startup_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--function", default=FUNCTION)
    parser.add_argument("--utterance", default=UTTERANCE)
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS,
        help="comma-separated: vllm-encode, vllm-encode-eager, server:FLAGS (flags split on spaces, "
        "'=' joins a flag and its value)",
    )  # fmt: skip
    parser.add_argument("-n", type=int, default=60, help="timed calls per configuration")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the results here")
    parser.add_argument("--child-encode", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bundle, args.model = args.bundle.resolve(), args.model.resolve()

    if args.child_encode:
        print("RESULT " + json.dumps(measure_encode(args, args.child_encode == "eager")), flush=True)
        return 0

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in (c for c in args.configs.split(",") if c):
            print(f"[defaults] {config} ...", file=sys.stderr, flush=True)
            if config.startswith("server:"):
                flags = [part for flag in config[len("server:") :].split() for part in flag.split("=", 1)]
                results[config] = measure_server(args, flags, Path(tmp))
            elif config in ("vllm-encode", "vllm-encode-eager"):
                mode = "eager" if config.endswith("eager") else "compiled"
                cmd = [sys.executable, __file__, "--child-encode", mode, "--bundle", str(args.bundle),
                       "--model", str(args.model), "-n", str(args.n), "--warmup", str(args.warmup),
                       "--function", args.function, "--utterance", args.utterance]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
                results[config] = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            else:
                parser.error(f"unknown configuration {config!r}")
            print(f"[defaults] {config}: {json.dumps(results[config])}", file=sys.stderr, flush=True)
    base_key = next((k for k in results if k.startswith("vllm-encode")), None)
    for result in results.values():
        if base_key is not None:
            result["p50_over_encode"] = round(result["p50_ms"] / results[base_key]["p50_ms"], 3)
    report = {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "baseline": base_key,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
