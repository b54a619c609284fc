"""vLLM alone: what a pooling step costs when its requests carry one adapter or eight different ones.

    python scripts/bench/gpu/make_bundle.py ROOT --bundles 8
    python scripts/bench/gpu/lora_mix.py --root ROOT --out OUT            # compiled, then eager

No probeserve code in the timed path: ``LLM.encode`` (engine core in-process) of 8 prompts
(the benchmark's ~60-token prompts) under the same LoRA request for all eight, or under eight
different ones, the two interleaved, ``--iters`` times each; each engine mode in a child
process of its own. It tells whether the cost of mixing adapters in one step (BENCHMARKS.md,
"several bundles") is vLLM's.
Writes OUT/lora_mix.json.
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
from typing import Any

ADAPTERS = 8


def child(root: Path, eager: bool, iters: int) -> dict[str, Any]:
    # The engine core in this process, as probeserve's inline engine runs it: otherwise every
    # call ships 8 prompts' hidden states (6 MB) between processes, which swamps the step.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_bundle import UTTERANCES  # the benchmark's own utterances (same folder)

    model = root / "llama8b"
    llm = LLM(
        model=str(model), runner="pooling", load_format="dummy", dtype="float16",
        pooler_config=PoolerConfig(task="token_embed", use_activation=False), enforce_eager=eager,
        enable_lora=True, max_loras=ADAPTERS, max_lora_rank=16, max_model_len=512, max_num_seqs=16,
        gpu_memory_utilization=0.5, enable_prefix_caching=False,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    prompts: list[TokensPrompt] = [
        {"prompt_token_ids": tokenizer(f"Function: {f}\n{u}\n\n")["input_ids"]}
        for f, u in (UTTERANCES * 2)[:ADAPTERS]
    ]
    loras = [
        LoRARequest(f"b{i}", i + 1, str(root / "bundles" / f"b{i}" / "lora_adapter")) for i in range(ADAPTERS)
    ]
    mixes = {"one adapter": [loras[0]] * ADAPTERS, "eight adapters": loras}
    for lora_requests in mixes.values():  # load every adapter, warm both shapes up
        for _ in range(3):
            llm.encode(prompts, pooling_task="token_embed", lora_request=lora_requests, use_tqdm=False)
    times: dict[str, list[float]] = {name: [] for name in mixes}
    for _ in range(iters):
        for name, lora_requests in mixes.items():
            t0 = time.perf_counter()
            llm.encode(prompts, pooling_task="token_embed", lora_request=lora_requests, use_tqdm=False)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        "mode": "eager" if eager else "compiled",
        "prompt_tokens": [len(p["prompt_token_ids"]) for p in prompts],
        **{f"{name} p50 ms": round(statistics.median(v), 2) for name, v in times.items()},
        **{f"{name} min ms": round(min(v), 2) for name, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--modes", default="compiled,eager")
    parser.add_argument("--child", choices=["compiled", "eager"])
    parser.add_argument("--timeout-s", type=float, default=240)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.root, args.child == "eager", args.iters)), flush=True)
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--root",
            str(args.root),
            "--iters",
            str(args.iters),
            "--child",
            mode,
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            results.append({"mode": mode, "error": f"timed out after {args.timeout_s} s"})
            continue
        found = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(found[0]) if found else {"mode": mode, "error": done.stderr[-3000:]})
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lora_mix.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
