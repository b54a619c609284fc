"""Issue 16: does a FULL (whole-step) CUDA graph work, exactly, for a causal token_embed pooling model?

vLLM (0.26 and 0.32) overrides ``cudagraph_mode=FULL`` to PIECEWISE for every pooling model in
``VllmConfig.__post_init__`` ("Pooling models do not support full cudagraphs"), without testing
the attention backend or whether the model is causal. This sets FULL again on the finished
config (``EngineArgs.create_engine_config`` wrapped) and compares three in-process engines of one
Llama-shaped checkpoint with dummy weights (fp16, ``max_num_seqs=16``, probeserve's capture
sizes 1-512, prefix caching off), one child process each:

- ``piecewise``: today's compiled engine (what probeserve runs);
- ``full``: the same with the mode set back to FULL after vLLM's override;
- ``eager``: ``enforce_eager``, a reference for the size of compiled-vs-eager differences.

Per mode: the mode the runner resolved, the CUDA-graph keys, the flash-attention version, which
runtime mode and padded size every real step dispatched to, p50/p90 of ``LLM.encode`` at batch 1
and 8 (58-token prompts), and every prompt's hidden states. The parent compares them with
piecewise's: bitwise equality and max abs/rel difference per case (batch 1 at every length 1-128
and some longer, one of 700 tokens > 512 that runs without a graph in every mode; batch 8 and 16).
Results go to ``OUT/fullgraph[_TAG].json`` after each mode, so a cut-off run keeps what it had.

    python3 scripts/bench/gpu/fullgraph_exp.py --model ROOT/llama8b --out $OUT
    python3 scripts/bench/gpu/fullgraph_exp.py --model ROOT/llama8b --out $OUT \\
        --lora ROOT/bundle/lora_adapter --tag lora        # the rank-16 adapter on every request

Run on one H200 (vLLM 0.26.0, PYTHONPATH=/tmp/site; ROOT from make_bundle.py), issue 16's device
calls; results in BENCHMARKS.md "Full CUDA graphs for the pooling runner".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

LONG_LENS = (129, 160, 200, 256, 300, 400, 500, 512, 700)  # 700 > the largest capture size: no graph
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # probeserve's (engines/config.py)
MODES = ("piecewise", "full", "eager")


def prompt(n: int, salt: int = 0) -> dict[str, list[int]]:
    return {"prompt_token_ids": [(1000 + 37 * salt + 11 * j) % 900 + 100 for j in range(n)]}


def cases() -> dict[str, list[Any]]:  # vLLM TokensPrompt dicts
    out = {f"b1_len{n}": [prompt(n)] for n in (*range(1, 129), *LONG_LENS)}
    out["b8_len58"] = [prompt(58, i) for i in range(8)]
    out["b16_mixed_5to50"] = [prompt(5 + 3 * i, i) for i in range(16)]  # 440 tokens: one graph
    out["b4_mixed_over512"] = [prompt(150 + 20 * i, i) for i in range(4)]  # 720 tokens: no graph
    return out


def child(args: argparse.Namespace) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the patches below reach the worker
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # 0.26 pools on V1 anyway; 0.32 would pick V2
    import torch
    from vllm import LLM
    from vllm.config import CUDAGraphMode, PoolerConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    mode = args.mode
    if mode == "full":  # the change under test: FULL again, after VllmConfig.__post_init__ set PIECEWISE
        original = EngineArgs.create_engine_config

        def patched(self: Any, *a: Any, **k: Any) -> Any:
            cfg = original(self, *a, **k)
            assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE, cfg.compilation_config
            cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL
            return cfg

        EngineArgs.create_engine_config = patched  # type: ignore[method-assign]

    seen: Counter[str] = Counter()  # runtime mode and padded batch of every step
    dispatch = CudagraphDispatcher.dispatch

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        runtime, desc = dispatch(self, *a, **k)
        seen[f"{runtime.name}@{desc.num_tokens}/reqs{desc.num_reqs}{'/lora' if desc.has_lora else ''}"] += 1
        return runtime, desc

    CudagraphDispatcher.dispatch = counted  # type: ignore[method-assign]
    kw: dict[str, Any] = dict(
        model=args.model, load_format="dummy", runner="pooling", seed=0,
        pooler_config=PoolerConfig(task="token_embed", use_activation=False),
        dtype="float16", enforce_eager=mode == "eager", max_model_len=1024, max_num_seqs=16,
        max_num_batched_tokens=2048, gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
    )  # fmt: skip
    if mode != "eager":
        kw["cudagraph_capture_sizes"] = CAPTURE_SIZES
    lora = None
    if args.lora:
        from vllm.lora.request import LoRARequest

        kw.update(enable_lora=True, max_lora_rank=16, max_loras=1)
        lora = LoRARequest("bench", 1, args.lora)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    res: dict[str, Any] = {"mode": mode, "startup_s": round(time.perf_counter() - t0, 1)}

    def probe(worker: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
            d = runner.cudagraph_dispatcher
            out["resolved"] = d.cudagraph_mode.name
            out["config_mode"] = runner.compilation_config.cudagraph_mode.name
            out["keys"] = {m.name: sorted({b.num_tokens for b in ks}) for m, ks in d.cudagraph_keys.items()}
            out["model_class"] = type(runner.model).__name__
            backends = {
                getattr(g.backend, "__name__", str(g.backend)) for gs in runner.attn_groups for g in gs
            }
            out["attn_backends"] = sorted(backends)
        except Exception as exc:  # a probe that fails must not lose the measurements
            out["probe_error"] = f"{type(exc).__name__}: {exc}"
        try:
            from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

            out["fa_version"] = get_flash_attn_version()
        except Exception as exc:
            out["fa_error"] = f"{type(exc).__name__}: {exc}"
        return out

    res["runner"] = llm.collective_rpc(probe)[0]
    print("RUNNER " + json.dumps(res["runner"]), flush=True)

    def encode(prompts: list[Any]) -> list[torch.Tensor]:
        outs = llm.encode(prompts, pooling_task="token_embed", use_tqdm=False, lora_request=lora)
        return [o.outputs.data.float().cpu() for o in outs]

    all_cases = cases()
    for _ in range(3):
        encode(all_cases["b8_len58"])  # warm-up
    seen.clear()
    hidden = {name: encode(ps) for name, ps in all_cases.items()}
    hidden["b1_len58_again"] = encode(all_cases["b1_len58"])  # same engine, same input: determinism
    res["dispatch"] = dict(sorted(seen.items()))
    for batch in (1, 8):
        ps = all_cases["b1_len58"] if batch == 1 else all_cases["b8_len58"]
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            llm.encode(ps, pooling_task="token_embed", use_tqdm=False, lora_request=lora)
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        res[f"b{batch}_ms"] = {
            "p50": round(statistics.median(times), 2),
            "p90": round(times[int(0.9 * (len(times) - 1))], 2),
            "min": round(times[0], 2),
            "n": len(times),
        }
    if torch.cuda.is_available():
        res["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    torch.save(hidden, f"/tmp/fg_hs_{args.tag}_{mode}.pt")
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no engine teardown


def compare(tag: str, other: str) -> dict[str, Any]:
    import torch

    ref = torch.load(f"/tmp/fg_hs_{tag}_piecewise.pt")
    got = torch.load(f"/tmp/fg_hs_{tag}_{other}.pt")
    out: dict[str, Any] = {}
    for name, tensors in ref.items():
        pairs = list(zip(tensors, got[name], strict=True))
        out[name] = {
            "bitwise": all(torch.equal(a, b) for a, b in pairs),
            "max_abs": max(float((a - b).abs().max()) for a, b in pairs),
            "max_rel": max(float(((a - b).abs() / a.abs().clamp_min(1e-3)).max()) for a, b in pairs),
        }
    lengths = {k: int(k[6:]) for k in out if k.startswith("b1_len") and k[6:].isdigit()}
    short = [k for k, n in lengths.items() if n <= 128]
    out["summary"] = {
        "b1_len1to128_all_bitwise": all(out[k]["bitwise"] for k in short),
        "b1_len1to128_not_bitwise": [k for k in short if not out[k]["bitwise"]],
        "max_abs_len1to128": max(out[k]["max_abs"] for k in short),
        "max_rel_len1to128": max(out[k]["max_rel"] for k in short),
        "not_bitwise": [k for k, v in out.items() if not v["bitwise"]],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lora", default="", help="a PEFT adapter sent with every request")
    ap.add_argument("--tag", default="base")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--timeout-s", type=float, default=240)
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)  # internal: one child
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fullgraph_{args.tag}.json"
    results: dict[str, Any] = {"model": args.model, "lora": args.lora, "capture_sizes": CAPTURE_SIZES}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--out", str(args.out), "--mode", mode,
               "--tag", args.tag, "--iters", str(args.iters), "--lora", args.lora,
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)]  # fmt: skip
        t0 = time.perf_counter()
        log = Path(f"/tmp/fg_{args.tag}_{mode}.log")
        try:
            with log.open("w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout_s)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        text = log.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        entry: dict[str, Any] = json.loads(lines[-1][7:]) if lines else {"rc": rc, "log_tail": text[-4000:]}
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        entry["log_lines"] = [
            line[-300:] for line in text.splitlines()
            if any(k in line for k in ("cudagraph", "CUDAGraph", "Graph capturing", "torch.compile",
                                       "Model loading took", "FLASH", "Flash", "attention backend"))
        ][:20]  # fmt: skip
        results[mode] = entry
        print(mode, json.dumps(entry)[:2000], flush=True)
        if (
            mode != "piecewise"
            and Path(f"/tmp/fg_hs_{args.tag}_{mode}.pt").exists()
            and Path(f"/tmp/fg_hs_{args.tag}_piecewise.pt").exists()
        ):
            results[f"piecewise_vs_{mode}"] = cmp = compare(args.tag, mode)
            print(mode, "vs piecewise:", json.dumps(cmp["summary"]), flush=True)
        path.write_text(json.dumps(results, indent=1))
    if Path(f"/tmp/fg_hs_{args.tag}_piecewise.pt").exists():
        import torch

        ref = torch.load(f"/tmp/fg_hs_{args.tag}_piecewise.pt")
        results["piecewise_self_bitwise"] = all(
            torch.equal(a, b) for a, b in zip(ref["b1_len58"], ref["b1_len58_again"], strict=True)
        )
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
