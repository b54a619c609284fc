"""Side-by-side benchmark: the engine in-process, this server, ``vllm serve``, transformers+peft.

One run measures, on the same inputs (``-n`` utterances drawn from the validation split with a
fixed ``--seed``), one system at a time, each in a process of its own (never two at once):

- (a) ``engine``: ``VllmEngine`` + ``Extractor`` in-process (vLLM's encode, prompt, heads, spans;
  no gRPC). Concurrency N: N asyncio tasks calling ``Extractor.extract``;
- (b) ``server``: ``probeserve serve`` (``launcher.start_server``) through the real
  ``AsyncProbeClient``; concurrency N: N calls in flight;
- (c) ``vllm-serve``: vLLM's own OpenAI-compatible HTTP server (what ``vllm serve`` runs) with the
  bundle's adapter as a LoRA module and the ``token_embed`` pooler without activation; the client
  sends prompt token ids to ``/pooling`` (base64 float32 output) and applies prompt building,
  heads and span decoding itself with ``probeserve.core.prompt/heads/spans`` (the same ``Extractor``);
  concurrency N: N HTTP requests in flight over one keep-alive session;
- (d) ``reference``: transformers + peft in-process. Concurrency 1: ``ReferenceModel.extract``
  (the independent reference code, one utterance at a time). Concurrency N > 1: batched, N
  prompts right-padded into one forward pass of the same peft model, then the serving heads.

Each system is warmed up (``--warmup`` sequential requests and one wave at the largest
concurrency), then its resident memory is read (RSS and PSS summed over the system's process
tree: the engine core child included), then every input is sent once per concurrency level
(closed loop). Reported: p50/p90 latency, throughput (items/s = inputs / wall time), the ratios
against (a), and the issue's checks. Every system's answers (presence, value, token span per
slot) are compared with (a)'s at concurrency 1; disagreements are counted and listed, since a
benchmark of wrong answers is worthless.

    python scripts/bench/baselines.py -n 20 --precision fp32 --out bench.json
    python scripts/bench/baselines.py --systems a,b --concurrency 1,8,16 --lora-mode merged

LoRA mode: (a), (b) and (c) run the same one: ``--lora-mode`` (default: what ``probeserve serve
--lora-mode auto`` picks, merged at full precision) goes to (a) as ``EngineConfig.lora_mode`` and
to (b) as ``--lora-mode``, and with ``merged`` (c) serves the same merged checkpoint
(``probeserve.engines.merge``, cached) without LoRA. (d) always runs peft's unmerged adapter: it is the
reference. ``--engine process|inline`` goes to (a) and (b) only when
given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from baselines_report import analyse, markdown
from common import Utterance, load_inputs, memory_mib, percentile, sample

SYSTEMS = {
    "a": "engine in-process",
    "b": "probeserve gRPC",
    "c": "vllm serve HTTP",
    "d": "transformers+peft",
}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
STARTUP_TIMEOUT_S = 900

Canonical = list[dict[str, Any]]  # one dict per slot: slot, present, value, span, p


# --------------------------------------------------------------------------------------------
# The systems (run in the child process)
# --------------------------------------------------------------------------------------------


class System(Protocol):
    root_pid: int  # the process whose tree holds the system (memory is summed over it)
    lora: str

    async def start(self) -> None: ...

    async def extract(self, item: Utterance) -> Canonical: ...

    async def stop(self) -> None: ...


def canonical(slots: Sequence[Any]) -> Canonical:
    """Slots of any of the four systems in one comparable form (span: utterance token indices)."""
    return [
        {
            "slot": s.name,
            "present": bool(s.present),
            "value": s.value if s.present else None,
            "span": [int(s.token_start), int(s.token_end)] if s.present else None,
            "p": round(float(s.presence_probability), 6),
        }
        for s in slots
    ]


def effective_lora_mode(requested: str | None, precision: str) -> str:
    """The LoRA mode (a), (b) and (c) all run: as ``probeserve serve --lora-mode auto`` picks it."""
    if requested in (None, "auto"):
        return "merged" if precision in TORCH_DTYPES else "adapter"
    return requested


def _engine_config(work: dict[str, Any], bundle: Any) -> Any:
    from probeserve.engines.config import EngineConfig

    return EngineConfig(
        model=Path(work["model"]),
        adapter=bundle.adapter_path if work["lora_mode"] == "merged" else None,
        lora_rank=bundle.lora_rank,
        precision=work["precision"],
        lora_mode=work["lora_mode"],
        inline=work["engine"] == "inline",
    )


class EngineSystem:
    """(a) VllmEngine + Extractor in this process, as the server assembles them, minus gRPC."""

    def __init__(self, work: dict[str, Any]) -> None:
        self.work = work
        self.root_pid = os.getpid()
        self.lora = work["lora_mode"]

    async def start(self) -> None:
        import torch

        from probeserve.core.bundle import load_bundle
        from probeserve.core.extraction import Extractor
        from probeserve.core.tokenization import HfPieceTokenizer
        from probeserve.engines.config import bind
        from probeserve.engines.start import start_engine

        torch.set_num_threads(1)  # as the server does: heads on one thread, cores left to the engine
        bundle = load_bundle(Path(self.work["bundle"]))
        tokenizer = HfPieceTokenizer.from_pretrained(self.work["model"])
        config = _engine_config(self.work, bundle)
        self.engine = await asyncio.to_thread(start_engine, config)
        adapter = None
        if config.lora_mode == "adapter":
            adapter = await self.engine.add_adapter(bundle.name, bundle.adapter_path, bundle.lora_rank)
        self.extractor = Extractor(bundle, tokenizer, bind(self.engine, adapter))

    async def extract(self, item: Utterance) -> Canonical:
        from probeserve.core.extraction import ExtractionRequest

        result = await self.extractor.extract(ExtractionRequest(item.function, item.utterance))
        return canonical(result.slots)

    async def stop(self) -> None:
        # Blocking the loop, as the server's own shutdown does, so vLLM's output handler task
        # does not run (and log the engine core's exit as an error) while the core stops.
        self.engine.shutdown()


class ServerSystem:
    """(b) ``probeserve serve`` through the real async client."""

    def __init__(self, work: dict[str, Any], log_dir: Path) -> None:
        self.work = work
        self.log_dir = log_dir
        self.lora = work["lora_mode"]

    async def start(self) -> None:
        from probeserve.launcher import start_server
        from probeserve_client import AsyncProbeClient

        extra: tuple[str, ...] = ("--lora-mode", self.work["lora_mode"])
        if self.work["engine"] is not None:
            extra += ("--engine", self.work["engine"])
        self.server = await asyncio.to_thread(
            start_server,
            bundle=Path(self.work["bundle"]),
            model=Path(self.work["model"]),
            precision=self.work["precision"],
            log_path=self.log_dir / "server-b.log",
            extra_args=extra,
            timeout_s=STARTUP_TIMEOUT_S,
        )
        self.root_pid = self.server.process.pid
        self.client = AsyncProbeClient(self.server.target, timeout=600, retries=0)

    async def extract(self, item: Utterance) -> Canonical:
        result = await self.client.extract(item.function, item.utterance)
        return canonical(result.slots)

    async def stop(self) -> None:
        await self.client.close()
        await asyncio.to_thread(self.server.stop)


class _PoolingHttpEngine:
    """What ``Extractor`` needs from an engine, answered by vLLM's HTTP ``/pooling`` endpoint."""

    def __init__(self, url: str, session: Any, max_prompt_tokens: int) -> None:
        self.url = url
        self.session = session
        self.max_prompt_tokens = max_prompt_tokens

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> Any:
        import numpy as np
        import torch

        body = {
            "model": "bundle",  # the LoRA module's (or the merged model's) name
            "input": token_ids,
            "task": "token_embed",
            "use_activation": False,
            "add_special_tokens": False,
            "encoding_format": "base64",
            "embed_dtype": "float32",
        }
        async with self.session.post(self.url, json=body, headers={"X-Request-Id": request_id}) as response:
            payload = await response.json()
            if response.status != 200:
                raise RuntimeError(f"/pooling answered {response.status}: {payload}")
        raw = base64.b64decode(payload["data"][0]["data"])
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(len(token_ids), -1).copy())


def _lora_rank_slot(rank: int) -> int:
    """vLLM's --max-lora-rank takes one of a fixed set of values: the smallest that fits."""
    return next(slot for slot in (8, 16, 32, 64, 128, 256, 320, 512) if rank <= slot)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmServeSystem:
    """(c) vLLM's OpenAI-compatible server; prompt, heads and spans in this (client) process.

    With the adapter, it is a LoRA module named ``bundle``; merged, the merged checkpoint is served
    under that name. Engine settings are probeserve's (max lengths, batch, eager, no prefix cache).
    """

    def __init__(self, work: dict[str, Any], log_dir: Path) -> None:
        self.work = work
        self.log_path = log_dir / "server-c.log"
        self.lora = "merged" if work["lora_mode"] == "merged" else "adapter"

    def command(self, port: int, bundle: Any) -> list[str]:
        pooler = json.dumps({"task": "token_embed", "use_activation": False})
        dtype = TORCH_DTYPES[self.work["precision"]]
        if self.lora == "merged":
            from probeserve.engines.merge import merged_checkpoint

            model = str(merged_checkpoint(Path(self.work["model"]), bundle.adapter_path, dtype))
            lora = ["--served-model-name", "bundle"]
        else:
            model = self.work["model"]
            rank = str(_lora_rank_slot(bundle.lora_rank))
            lora = ["--enable-lora", "--max-loras", "1", "--max-lora-rank", rank]
            lora += ["--lora-modules", f"bundle={bundle.adapter_path}"]
        return [
            sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", model, "--runner", "pooling", "--pooler-config", pooler, "--dtype", dtype,
            "--max-model-len", "512", "--max-num-seqs", "16", "--max-num-batched-tokens", "2048", *lora,
            "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0",
            "--host", "127.0.0.1", "--port", str(port),
            "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log",
        ]  # fmt: skip

    async def start(self) -> None:
        import aiohttp
        import torch

        from probeserve.core.bundle import load_bundle
        from probeserve.core.extraction import Extractor
        from probeserve.core.tokenization import HfPieceTokenizer

        torch.set_num_threads(1)
        bundle = load_bundle(Path(self.work["bundle"]))
        port = _free_port()
        env = os.environ.copy()
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # as probeserve's engine sets it
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(port, bundle), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.root_pid = self.process.pid
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"vllm serve did not become healthy; log tail:\n{tail}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            await asyncio.sleep(0.5)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        engine = _PoolingHttpEngine(f"{base}/pooling", self.session, max_prompt_tokens=512)
        self.extractor = Extractor(bundle, HfPieceTokenizer.from_pretrained(self.work["model"]), engine)

    async def extract(self, item: Utterance) -> Canonical:
        from probeserve.core.extraction import ExtractionRequest

        result = await self.extractor.extract(ExtractionRequest(item.function, item.utterance))
        return canonical(result.slots)

    async def stop(self) -> None:
        await self.session.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class _NoEngine:
    """Lets ``Extractor`` build and check prompts for the batched reference path."""

    max_prompt_tokens = 512

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> Any:
        raise NotImplementedError


class ReferenceSystem:
    """(d) transformers + peft in this process; blocking, so concurrency > 1 means batching."""

    lora = "adapter (peft, unmerged)"

    def __init__(self, work: dict[str, Any]) -> None:
        self.work = work
        self.root_pid = os.getpid()

    async def start(self) -> None:
        import torch

        from probeserve.core.bundle import load_bundle
        from probeserve.core.extraction import Extractor
        from probeserve.core.tokenization import HfPieceTokenizer
        from probeserve.pairing.reference import ReferenceModel

        bundle = load_bundle(Path(self.work["bundle"]))
        dtype = getattr(torch, TORCH_DTYPES[self.work["precision"]])
        self.reference = ReferenceModel(self.work["model"], bundle, dtype=dtype)
        self.extractor = Extractor(bundle, HfPieceTokenizer(self.reference.tokenizer), _NoEngine())

    async def extract(self, item: Utterance) -> Canonical:
        return canonical(self.reference.extract(item.function, item.utterance))

    def extract_batch(self, items: Sequence[Utterance]) -> list[Canonical]:
        """One forward pass over the right-padded prompts (causal: padding changes no real token)."""
        import torch

        from probeserve.core.extraction import ExtractionRequest

        prompts = [self.extractor.prepare(ExtractionRequest(i.function, i.utterance)) for i in items]
        longest = max(len(p.token_ids) for p in prompts)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt.token_ids)] = torch.tensor(prompt.token_ids)
            mask[row, : len(prompt.token_ids)] = 1
        decoder: Any = self.reference.model.get_base_model().model
        with torch.no_grad():
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state.to(torch.float32)
        return [
            canonical(self.extractor.read_slots(p, item.utterance, hidden[row, : len(p.token_ids)]))
            for row, (p, item) in enumerate(zip(prompts, items, strict=True))
        ]

    async def stop(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Measuring one system (child process)
# --------------------------------------------------------------------------------------------


async def run_level(system: System, items: Sequence[Utterance], concurrency: int) -> dict[str, Any]:
    """Every item once, ``concurrency`` in flight (closed loop), or batched for the reference."""
    latencies = [0.0] * len(items)
    results: list[Canonical] = [[] for _ in items]
    started = time.perf_counter()
    if isinstance(system, ReferenceSystem) and concurrency > 1:
        for first in range(0, len(items), concurrency):
            chunk = items[first : first + concurrency]
            t0 = time.perf_counter()
            answers = system.extract_batch(chunk)
            took = (time.perf_counter() - t0) * 1e3
            for offset, answer in enumerate(answers):
                results[first + offset], latencies[first + offset] = answer, took
    else:
        order = iter(range(len(items)))

        async def worker() -> None:
            for index in order:
                t0 = time.perf_counter()
                results[index] = await system.extract(items[index])
                latencies[index] = (time.perf_counter() - t0) * 1e3

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "how": "batched" if isinstance(system, ReferenceSystem) and concurrency > 1 else "closed loop",
        "p50_ms": round(statistics.median(latencies), 1),
        "p90_ms": round(percentile(latencies, 0.9), 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
        "max_ms": round(max(latencies), 1),
        "wall_s": round(wall, 3),
        "items_per_s": round(len(items) / wall, 3),
        "latencies_ms": [round(x, 2) for x in latencies],
        "results": results,
    }


async def measure(system_key: str, work: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    systems: dict[str, Any] = {
        "a": lambda: EngineSystem(work),
        "b": lambda: ServerSystem(work, log_dir),
        "c": lambda: VllmServeSystem(work, log_dir),
        "d": lambda: ReferenceSystem(work),
    }
    system: System = systems[system_key]()
    items = [Utterance(**i) for i in work["inputs"]]
    levels: list[int] = work["concurrency"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    await system.start()
    startup_s = time.perf_counter() - t0
    try:
        for i in range(work["warmup"]):
            await system.extract(items[i % len(items)])
        wave = [items[i % len(items)] for i in range(max(levels))]
        await run_level(system, wave, max(levels))
        memory = memory_mib(system.root_pid)
        runs = {str(c): await run_level(system, items, c) for c in levels}
    finally:
        await system.stop()
    return {
        "system": system_key,
        "name": SYSTEMS[system_key],
        "lora": system.lora,
        "startup_s": round(startup_s, 1),
        "memory_after_warmup": memory,
        "client_memory": memory_mib(os.getpid()) if system_key in "bc" else None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# The parent: inputs, one child per system, then the report (baselines_report.py)
# --------------------------------------------------------------------------------------------


def run_child(system_key: str, work: dict[str, Any], log_dir: Path) -> dict[str, Any]:
    """Measure one system in a fresh process, so none inherits another's state or memory."""
    work_path = log_dir / "work.json"
    result_path = log_dir / f"result-{system_key}.json"
    work_path.write_text(json.dumps(work))
    log_path = log_dir / f"bench-{system_key}.log"
    with log_path.open("wb") as log:
        cmd = [sys.executable, __file__, "--child", system_key, "--work", str(work_path)]
        done = subprocess.run([*cmd, "--result", str(result_path), "--log-dir", str(log_dir)],
                              stdout=log, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"system ({system_key}) failed (exit {done.returncode}); log tail:\n{tail}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def main() -> int:
    from probeserve.cli import DEMO_BUNDLE, DEMO_MODEL

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument(
        "--precision", choices=["auto", *TORCH_DTYPES], default="fp32", help="fp32 compares exactly"
    )
    parser.add_argument("--systems", default="a,b,c,d", help="comma-separated, of a,b,c,d")
    parser.add_argument("-n", type=int, default=20, help="utterances drawn from the validation split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels (default: 1,8)")
    parser.add_argument("--warmup", type=int, default=3, help="sequential warm-up requests per system")
    parser.add_argument(
        "--lora-mode", choices=["auto", "adapter", "merged"],
        help="for (a), (b) and (c) (default: as `probeserve serve` picks; see above)",
    )  # fmt: skip
    parser.add_argument("--engine", choices=["process", "inline"], help="for (a) and (b), only when given")
    parser.add_argument("--inputs", type=Path, help="JSONL of {function, utterance} instead of the split")
    parser.add_argument("--data", type=Path, help="data directory of the validation split")
    parser.add_argument("--out", type=Path, help="write the full report (latencies, answers) here")
    parser.add_argument("--log-dir", type=Path, help="keep the systems' logs here (default: a temp dir)")
    parser.add_argument("--child", choices=sorted(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        work = json.loads(args.work.read_text())
        result = asyncio.run(measure(args.child, work, args.log_dir))
        args.result.write_text(json.dumps(result))
        return 0

    from probeserve.engines.config import resolve_precision

    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    if not keys or any(k not in SYSTEMS for k in keys):
        parser.error(f"--systems takes a comma-separated subset of {','.join(SYSTEMS)}")
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    items = sample(load_inputs(args.inputs, args.data), args.n, args.seed)
    precision = resolve_precision(args.precision)
    if precision not in TORCH_DTYPES:
        parser.error(f"precision {precision}: (c) and (d) need one of {', '.join(TORCH_DTYPES)}")
    work = {
        "bundle": str(args.bundle.resolve()),
        "model": str(args.model.resolve()),
        "precision": precision,
        "lora_mode": effective_lora_mode(args.lora_mode, precision),
        "lora_mode_requested": args.lora_mode,
        "engine": args.engine,
        "concurrency": levels,
        "warmup": args.warmup,
        "seed": args.seed,
        "inputs": [dataclasses.asdict(i) for i in items],
    }
    report: dict[str, Any] = {
        "settings": {k: v for k, v in work.items() if k != "inputs"} | {"cpus": os.cpu_count()},
        "inputs": work["inputs"],
        "systems": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            print(f"[bench] ({key}) {SYSTEMS[key]} ...", file=sys.stderr, flush=True)
            result = run_child(key, work, log_dir)
            report["systems"][key] = result
            top = result["runs"][str(levels[-1])]
            print(f"[bench] ({key}) started in {result['startup_s']} s; c={levels[-1]}: "
                  f"{top['items_per_s']} items/s", file=sys.stderr, flush=True)  # fmt: skip
    analyse(report)
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
