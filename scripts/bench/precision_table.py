"""The "Choosing a precision" table: accuracy, memory and latency of each precision, one run.

    python scripts/bench/precision_table.py                          # fp32 and awq, demo bundle
    python scripts/bench/precision_table.py --configs fp32,awq,lookalike-awq -n 200 --out table.json

For each configuration, one after another, it starts the real server (``probeserve serve``,
pairing check on), then through the real client:

- records the pairing check's function figures (from the server's log);
- resident memory of the serving process tree (RSS and PSS, the engine core included) after
  warm-up and again after the accuracy pass (the peak of the two is reported);
- exact match and presence accuracy on the validation split (one ExtractStream over the
  examples; definitions as in scripts/evaluate.py);
- p50/p90 latency of unary Extract at concurrency 1 and 8 (closed loop, the same utterances).

``lookalike-awq`` is the AWQ checkpoint of a *different fine-tune* (scripts/make_lookalike.py,
then scripts/quantize_awq.py): it runs with ``--skip-pairing-check`` to show what the check
saves a deployment from (its check result is taken from ``probeserve check-pairing``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import memory_mib, percentile
from xlam_data import load_split, score

from probeserve.cli import DEMO_AWQ_MODEL, DEMO_BUNDLE, DEMO_MODEL, DEMO_MODELS
from probeserve.launcher import RunningServer, start_server
from probeserve_client import AsyncProbeClient, ExtractItem, ProbeClient

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"model": DEMO_MODEL, "precision": "fp32", "args": ()},
    "bf16": {"model": DEMO_MODEL, "precision": "bf16", "args": ()},
    "awq": {"model": DEMO_AWQ_MODEL, "precision": "awq", "args": ()},
    "lookalike-awq": {
        "model": DEMO_MODELS / "smollm2-135m-lookalike-awq",
        "precision": "awq",
        "args": ("--skip-pairing-check",),
    },
}


def _event(server: RunningServer, name: str) -> dict[str, Any] | None:
    return next((e for e in server.log_lines() if e.get("event") == name), None)


async def _latency(target: str, items: list[ExtractItem], concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    order = iter(items)
    async with AsyncProbeClient(target, timeout=600) as client:

        async def worker() -> None:
            for item in order:
                t0 = time.perf_counter()
                await client.extract(item.function, item.utterance)
                latencies.append((time.perf_counter() - t0) * 1e3)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "p50_ms": round(statistics.median(latencies), 1),
        "p90_ms": round(percentile(latencies, 0.9), 1),
        "items_per_s": round(len(latencies) / wall, 3),
    }


def _check_pairing(bundle: Path, model: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "probeserve", "check-pairing", "--bundle", str(bundle), "--model", str(model),
         "--keep-going", "--log-format", "json"],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    return {"exit_code": result.returncode, "failed": [line for line in lines if line.startswith("FAIL")]}


def measure(
    name: str, bundle: Path, examples: list[Any], schemas: Any, latency_n: int, log_dir: Path
) -> dict[str, Any]:
    config = CONFIGS[name]
    row: dict[str, Any] = {"config": name, "model": str(config["model"]), "precision": config["precision"]}
    if "--skip-pairing-check" in config["args"]:
        row["check_pairing"] = _check_pairing(bundle, config["model"])
    server = start_server(
        bundle=bundle, model=config["model"], precision=config["precision"],
        log_path=log_dir / f"{name}.log", extra_args=config["args"], timeout_s=1800,
    )  # fmt: skip
    try:
        row["startup_s"] = round(server.startup_s, 1)
        row["pairing_function"] = _event(server, "pairing_function")
        row["lora_mode"] = (_event(server, "engine_started") or {}).get("lora_mode")
        memory_warm = memory_mib(server.process.pid)
        items = [ExtractItem(e.function, e.utterance, request_id=str(e.line)) for e in examples]
        started = time.perf_counter()
        with ProbeClient(server.target, timeout=600) as client:
            answers = list(client.stream(items, timeout=24 * 3600))
        row["accuracy_pass_s"] = round(time.perf_counter() - started, 1)
        predictions = []
        for item, answer in zip(items, answers, strict=True):
            if answer.extraction is None or answer.request_id != item.request_id:
                raise SystemExit(f"{name}: stream answered {answer} for {item.request_id}")
            predictions.append(dict(answer.extraction.values()))
        row["accuracy"] = score(examples, predictions, schemas)
        memory_after = memory_mib(server.process.pid)
        row["memory_mib"] = {
            "rss": max(memory_warm["rss_mib"], memory_after["rss_mib"]),
            "pss": max(memory_warm["pss_mib"], memory_after["pss_mib"]),
            "processes": memory_after["processes"],
        }
        timed = items[:latency_n]
        row["latency"] = {f"c{c}": asyncio.run(_latency(server.target, timed, c)) for c in (1, 8)}
    finally:
        server.stop()
    return row


HEADER = (
    "| config | lora | exact match | presence | pairing check | RSS / PSS MiB | p50 c=1 ms | p50 c=8 ms |\n"
    "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"
)


def _check(row: dict[str, Any]) -> str:
    if "check_pairing" not in row:
        return "passed" if row.get("pairing_function") else "-"
    failed = row["check_pairing"]["failed"]
    return f"refused ({failed[0].split(':')[0].removeprefix('FAIL ')})" if failed else "passed"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for row in rows:
        acc, memory, latency = row["accuracy"], row["memory_mib"], row["latency"]
        cells = [
            row["config"],
            str(row["lora_mode"]),
            f"{acc['exact_match']:.2%}",
            f"{acc['presence_accuracy']:.2%}",
            _check(row),
            f"{memory['rss']:.0f} / {memory['pss']:.0f}",
            f"{latency['c1']['p50_ms']:.0f}",
            f"{latency['c8']['p50_ms']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="fp32,awq", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("-n", type=int, help="only the first N validation examples (default: all 661)")
    parser.add_argument("--latency-n", type=int, default=40, help="requests per concurrency level")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    schemas, _train, validation = load_split()
    examples = validation[: args.n] if args.n else validation
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            rows.append(measure(name, args.bundle, examples, schemas, args.latency_n, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(
            json.dumps({"examples": len(examples), "rows": rows, "table": table}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
