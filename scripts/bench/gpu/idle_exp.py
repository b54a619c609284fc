"""Issue 16: why is a step slower after an idle spell? The CPU or the GPU going idle, measured apart.

On the H200 the engine alone answered a 58-token prompt in 7.3 ms back to back, but in 9.5 ms
with a 3 ms pause before each request (the pause a gRPC closed loop at concurrency 1 leaves), and
inside the server, where every request follows such a pause, the engine took 8.8 ms. Holding
``/dev/cpu_dma_latency`` at 0 changed nothing (BENCHMARKS.md). This times ``LLM.encode`` (vLLM
in-process, probeserve's engine settings: fp16, compiled, its capture sizes, ``token_embed``)
after pauses of different kinds, in interleaved rounds, on one GPU:

- ``none``: back to back;
- ``sleep``: ``time.sleep`` (CPU thread asleep, GPU idle): what the server sees;
- ``spin``: a busy loop on the CPU for the same time (CPU hot, GPU idle);
- ``gpu``: the GPU kept busy (``torch.cuda._sleep``) for most of the pause while the thread sleeps
  (CPU asleep, GPU not idle);
- ``both``: the GPU kept busy and the CPU spinning;
- ``sleep10``: a 10 ms sleep.

Whichever of ``spin`` or ``gpu`` brings the time back to ``none`` says which side's idling costs
it. Nothing here changes a setting of the GPU or the host; ``nvidia-smi`` is only read.

    python3 scripts/bench/gpu/idle_exp.py --model ROOT/llama8b --out OUT [--gap-ms 3 --n 40 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # probeserve's (engines/config.py)


def smi() -> str:
    query = "clocks.sm,clocks.mem,power.draw,pstate"
    try:
        return subprocess.run(
            ["nvidia-smi", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
             f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gap-ms", type=float, default=3.0)
    parser.add_argument("--n", type=int, default=40, help="requests per kind of pause and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--eager", action="store_true", help="no compilation (a quick dry run on the CPU)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, as the server's
    import torch
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    kw: dict[str, Any] = dict(
        model=args.model, load_format="dummy", runner="pooling", seed=0,
        pooler_config=PoolerConfig(task="token_embed", use_activation=False), dtype="float16",
        max_model_len=512, max_num_seqs=16, max_num_batched_tokens=2048, enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.eager,
    )  # fmt: skip
    if torch.cuda.is_available():
        kw["cudagraph_capture_sizes"] = CAPTURE_SIZES
    llm = LLM(**kw)
    result: dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 1), "gap_ms": args.gap_ms}
    prompt = [TokensPrompt(prompt_token_ids=[(1000 + 11 * j) % 900 + 100 for j in range(58)])]

    def encode() -> None:
        llm.encode(prompt, pooling_task="token_embed", use_tqdm=False)

    gpu: Any = torch.cuda  # Event and _sleep are untyped
    cuda = gpu.is_available()  # without a GPU (a dry run on the CPU) the GPU pauses are left out
    cycles = 0
    if cuda:  # torch.cuda._sleep spins the GPU for a number of cycles: find how many make ~0.8 of the pause
        start, end = gpu.Event(enable_timing=True), gpu.Event(enable_timing=True)
        start.record()
        gpu._sleep(1_000_000)
        end.record()
        end.synchronize()
        cycles = int(1_000_000 * 0.8 * args.gap_ms / start.elapsed_time(end))
    result["gpu_sleep_cycles"] = cycles
    gap_s = args.gap_ms / 1e3

    def spin(seconds: float) -> None:
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass

    def gpu_busy(then: Callable[[float], None]) -> Callable[[], None]:
        def pause() -> None:
            gpu._sleep(cycles)  # queued: the GPU spins while the thread sleeps or spins
            then(gap_s)

        return pause

    pauses: dict[str, Callable[[], None]] = {
        "none": lambda: None,
        "sleep": lambda: time.sleep(gap_s),
        "spin": lambda: spin(gap_s),
        "gpu": gpu_busy(time.sleep),
        "both": gpu_busy(spin),
        "sleep10": lambda: time.sleep(0.010),
    }
    if not cuda:
        del pauses["gpu"], pauses["both"]
    for _ in range(10):
        encode()
    result["smi_idle"] = smi()
    samples: dict[str, list[float]] = {name: [] for name in pauses}
    for _ in range(args.rounds):
        for name, pause in pauses.items():
            for _ in range(args.n):
                pause()
                if name in ("gpu", "both"):
                    torch.cuda.synchronize()  # the GPU's spin is over before the clock starts
                t = time.perf_counter()
                encode()
                samples[name].append((time.perf_counter() - t) * 1e3)
    busy_until = time.perf_counter() + 1.0
    while time.perf_counter() < busy_until:
        encode()
    result["smi_after_load"] = smi()
    result["encode_ms"] = {
        name: {
            "p50": round(statistics.median(values), 2),
            "p90": round(sorted(values)[int(0.9 * (len(values) - 1))], 2),
            "min": round(min(values), 2),
            "n": len(values),
        }
        for name, values in samples.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "idle_exp.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    os._exit(0)  # no engine teardown


if __name__ == "__main__":
    main()
