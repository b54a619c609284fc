"""The GPU benchmark's report: the tables that ``gpu_bench.py``'s measurements become.

Measuring and reporting are apart so that the tables can be remade from the JSON of several
runs without a GPU, and so that the bookkeeping (pairing the client's stamps with the server's
log lines into wire times) is tested on its own (``tests/test_gpu_bench.py``).

    python scripts/bench/gpu_report.py A.json B.json > table.md   # one table from several runs
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

TARGET_C1 = 1.10  # gRPC p50 over the floor's, concurrency 1 (issue #8)
TARGET_C8 = 1.15
# The reference recipe's Llama-3.1-8B numbers (ms; GB of weights), for the table.
RECIPE = {"fp16": (21.0, 35.0, 14.3), "awq": (56.0, 42.0, 4.7)}
SERVER_STAGES = ("engine_ms", "heads_ms", "queue_ms", "prepare_ms", "total_ms")


def log_lines(log_path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
    return lines


def wire_times(line: dict[str, Any], stamp: Any) -> tuple[float, float] | None:
    """(client send -> server handler, server log line -> client receive) in ms, from the client's
    wall-clock stamps and the server's log line, which is written when the handler is done
    (``total_ms`` after it began)."""
    try:
        logged = datetime.datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()
        sent, received = float(stamp[0]), float(stamp[1])
        began = logged - float(line["total_ms"]) / 1e3
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return (began - sent) * 1e3, (received - logged) * 1e3


def server_breakdown(log_path: Path, stamps: dict[str, Any]) -> dict[str, dict[str, float]]:
    """p50 of each stage the server logged, per gRPC measurement (variant, concurrency, client),
    and, where the client stamped its requests, of the time on the way in and on the way out."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for line in log_lines(log_path):
        rid = str(line.get("request_id", ""))
        if line.get("event") == "extract" and "-r" in rid and not rid.startswith("warm"):
            groups.setdefault(rid.rsplit("-r", 1)[0], []).append(line)
    out: dict[str, dict[str, float]] = {}
    for group, lines in groups.items():
        found = out.setdefault(group, {})
        for stage in SERVER_STAGES:
            values = [float(x[stage]) for x in lines if stage in x]
            if values:
                found[stage.removesuffix("_ms") + "_p50_ms"] = round(statistics.median(values), 2)
        wires = [w for x in lines if (w := wire_times(x, stamps.get(str(x["request_id"])))) is not None]
        if wires:
            found["wire_in_p50_ms"] = round(statistics.median(w[0] for w in wires), 2)
            found["wire_out_p50_ms"] = round(statistics.median(w[1] for w in wires), 2)
    return out


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "p50_ms") -> float | None:
    try:
        return round(float(a[key]) / float(b[key]), 3)  # type: ignore[index]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def judge(entry: dict[str, Any]) -> None:
    """gRPC over floor and over engine alone, per variant and concurrency; the headline client is
    the sync ProbeClient at concurrency 1 and the AsyncProbeClient above. (``vllm serve`` entries
    have no verdicts: ``serve_markdown`` sets them beside the server's.)"""
    if entry.get("result", {}).get("kind") == "vllm-serve":
        return
    measured = entry.get("result", {}).get("measured", {})
    verdicts: dict[str, Any] = {}
    for key in {k.rsplit("/", 1)[0] for k in measured}:
        c = int(key.rsplit("/c", 1)[1])
        client = "grpc_sync" if c == 1 else "grpc_async"
        grpc = measured.get(f"{key}/{client}")
        target = TARGET_C1 if c == 1 else TARGET_C8
        over_floor = ratio(grpc, measured.get(f"{key}/floor"))
        verdicts[key] = {
            "client": client,
            "grpc_over_floor": over_floor,
            "grpc_over_engine": ratio(grpc, measured.get(f"{key}/engine")),
            "target": target,
            "met": None if over_floor is None else over_floor <= target,
        }
    entry["verdicts"] = verdicts


def fmt(d: dict[str, Any] | None) -> str:
    if not d or "p50_ms" not in d:
        return "—"
    return f"{d['p50_ms']:.1f} / {d['p90_ms']:.1f}"


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| config | LoRA | variant | C | engine alone | floor (engine+heads) | gRPC sync client "
        "| gRPC async client | gRPC, C client processes | gRPC / floor | gRPC / engine "
        "| in server: engine / heads / total |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for e in results:
        precision, lora = _config_facts(e)
        res = e.get("result", {})
        measured, server = res.get("measured", {}), res.get("server", {})
        for key in sorted(e.get("verdicts", {}), key=lambda k: (int(k.rsplit("/c", 1)[1]), k)):
            v = e["verdicts"][key]
            variant, c = key.rsplit("/c", 1)
            logged = server.get(f"{variant}-c{c}-{'sync' if c == '1' else 'async'}", {})
            inside = " / ".join(str(logged.get(f"{s}_p50_ms", "—")) for s in ("engine", "heads", "total"))
            mark = "✓" if v["met"] else "✗"
            cells = [
                e["config"], "r16 per request" if lora else "none (= merged)", variant, c,
                fmt(measured.get(f"{key}/engine")), fmt(measured.get(f"{key}/floor")),
                fmt(measured.get(f"{key}/grpc_sync")), fmt(measured.get(f"{key}/grpc_async")),
                fmt(measured.get(f"{key}/grpc_procs")),
                f"{v['grpc_over_floor']:.2f} {mark} (≤ {v['target']:.2f})" if v["grpc_over_floor"] else "—",
                f"{v['grpc_over_engine']:.2f}" if v["grpc_over_engine"] else "—", inside,
            ]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
        recipe = RECIPE.get(precision)
        notes.append(
            f"- {e['config']}: startup {res.get('startup_s', '—')} s, "
            f"GPU {res.get('nvidia_smi_used_mib', '—')} MiB, "
            f"heads {json.dumps(res.get('heads', {}))}"
            + (f", recipe b1 / b8 {recipe[0]:.0f} / {recipe[1]:.0f} ms" if recipe else "")
            + (f", error: {e['error']}" if "error" in e else "")
        )
    rows.append("")
    rows.append(
        "ms, p50 / p90 per request, closed loop; variant wN-siM: batch wait N ms, GIL switch interval M ms"
        " (-noidle: /dev/cpu_dma_latency held at 0)."
    )
    extra = ["", *c1_breakdown(results)]
    if any(e.get("result", {}).get("kind") == "vllm-serve" for e in results):
        extra += ["", *serve_markdown(results)]
    if any("profile" in e.get("result", {}) for e in results):
        extra += ["", *profile_markdown(results)]
    return "\n".join(rows + notes + extra) + "\n"


# -- stock vllm serve beside the server -----------------------------------------------------------


def _grpc_p50(results: list[dict[str, Any]], config: str, c: int) -> float | None:
    """The server's headline gRPC p50 for a configuration (first variant measured)."""
    for e in results:
        if e["config"] != config:
            continue
        measured = e.get("result", {}).get("measured", {})
        client = "grpc_sync" if c == 1 else "grpc_async"
        for key in sorted(measured):
            if key.endswith(f"/c{c}/{client}"):
                return float(measured[key]["p50_ms"])
    return None


def serve_markdown(results: list[dict[str, Any]]) -> list[str]:
    """``vllm serve`` + ``/pooling`` + numpy heads, per encoding and concurrency, beside the
    server's gRPC p50 for the same checkpoint when that ran in the same results."""
    rows = [
        "What a user would pick instead: stock `vllm serve` (token_embed pooler), `/pooling` with the"
        " same token ids, heads and spans in a numpy client (C threads, keep-alive). p50 / p90 ms;"
        " HTTP: request sent to body read; decode: body to float32 array.",
        "",
        "| checkpoint | encoding | C | response bytes | **total** | HTTP | decode | heads (numpy) | spans |"
        " probeserve gRPC p50 | total / gRPC |",
        "| --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in results:
        res = e.get("result", {})
        if res.get("kind") != "vllm-serve":
            continue
        base = e["config"].removeprefix("vllm-serve-")
        measured, sizes = res.get("measured", {}), res.get("response_bytes", {})
        for key in sorted(measured, key=lambda k: (int(k.rsplit("/c", 1)[1]), k)):
            encoding, c = key.rsplit("/c", 1)
            stages = measured[key]
            grpc = _grpc_p50(results, base, int(c))
            total = stages.get("total", {}).get("p50_ms")
            cells = [
                base, encoding, c, f"{sizes.get(encoding, 0):,}", f"**{fmt(stages.get('total'))}**",
                *(fmt(stages.get(s)) for s in ("http", "decode", "heads", "spans")),
                "—" if grpc is None else f"{grpc:.1f}",
                "—" if grpc is None or not total else f"{float(total) / grpc:.1f}x",
            ]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
        gpu = res.get("nvidia_smi_used_mib", "—")
        error = f", error: {e['error']}" if "error" in e else ""
        rows.append(
            f"- {e['config']}: startup {res.get('startup_s', '—')} s, GPU {gpu} MiB,"
            f" checks {res.get('checks', {})}{error}"
        )
    return rows


# -- py-spy under concurrency-8 load ---------------------------------------------------------------

_THREAD = re.compile(r"^thread \((\w+)\)(?::\s*(.*))?$")


def _idle(frames: list[str]) -> bool:
    """The event loop waiting in epoll: a stack through ``EpollSelector.select (selectors.py:...)``
    (with ``--native``, epoll_wait's own frames lie below it)."""
    for frame in frames:
        function, _, where = frame.partition(" (")
        if where.startswith("selectors.py") and function.endswith("select"):
            return True
    return False


def summarise_pyspy(raw: str, top: int = 25) -> dict[str, Any]:
    """``py-spy record --format raw --threads --idle --function`` output (one ``thread (TID): NAME;
    frame;...;leaf COUNT`` line per distinct stack) as, per thread, its samples, the share spent
    in ``selectors.select`` (an idle event loop), and the top frames by self (leaf) and inclusive
    samples among the busy ones."""
    threads: dict[str, dict[str, Any]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = _THREAD.match(frames[0])
        if match:
            tid, name, frames = match.group(1), match.group(2) or "", frames[1:]
            if name and frames and frames[0] == name:
                frames = frames[1:]
            if not name and frames and " (" not in frames[0]:
                name, frames = frames[0], frames[1:]
        else:
            tid, name = "?", ""
        t = threads.setdefault(
            tid,
            {
                "name": name,
                "samples": 0,
                "idle": 0,
                "self": collections.Counter(),
                "incl": collections.Counter(),
            },
        )
        n = int(count)
        t["samples"] += n
        leaf = frames[-1] if frames else "(no frames)"
        if _idle(frames):
            t["idle"] += n
            continue
        t["self"][leaf] += n
        for frame in set(frames):
            t["incl"][frame] += n
    out = []
    for tid, t in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        busy = t["samples"] - t["idle"]
        out.append({
            "tid": tid, "name": t["name"], "samples": t["samples"],
            "idle_share": round(t["idle"] / t["samples"], 3) if t["samples"] else None,
            "busy_samples": busy,
            "top_self": t["self"].most_common(top),
            "top_inclusive": t["incl"].most_common(top * 2),
        })  # fmt: skip
    return {"threads": out, "loop_shares": loop_shares(raw)}


# What the event loop's busy samples were doing: the deepest frame of one of these kinds names it.
PROMPT_FILES = ("probeserve/core/tokenization", "probeserve/core/prompt", "probeserve/core/segmentation")
LOOP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prompt building", (*PROMPT_FILES, "tokenizers")),
    ("protobuf (messages.to_response, upb)", ("probeserve/transport/messages", "_pb2", "protobuf", "upb")),
    ("logging (structlog)", ("structlog", "probeserve/logs")),
    ("metrics (prometheus)", ("prometheus", "probeserve/transport/metrics")),
    ("span decoding", ("probeserve/core/spans",)),
    ("engine hand-off (probeserve/engines)", ("probeserve/engines/",)),
    ("servicer and extractor (other probeserve)", ("probeserve/",)),
    ("gRPC (cygrpc)", ("cygrpc", "grpc/")),
    ("asyncio", ("asyncio/", "_asyncio")),
)  # fmt: skip


def loop_shares(raw: str, thread: str = "MainThread") -> dict[str, int]:
    """Busy samples of one thread (the event loop) of a raw py-spy record, by LOOP_KINDS, plus
    ``idle`` (in epoll) and ``busy``. With ``--native`` the Cython and C frames count too; without,
    gRPC's Cython work shows as asyncio (``Handle._run`` with nothing below it)."""
    out: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        match = _THREAD.match(frames[0]) if count.isdigit() else None
        if not match or (match.group(2) or "") != thread:
            continue
        n = int(count)
        if _idle(frames[1:]):
            out["idle"] += n
            continue
        out["busy"] += n
        kind = next(
            (k for f in reversed(frames[1:]) for k, marks in LOOP_KINDS if any(m in f for m in marks)),
            "other",
        )
        out[kind] += n
    return dict(out)


def profile_markdown(results: list[dict[str, Any]], top: int = 12) -> list[str]:
    """Per profiled configuration: the threads' shares and the event loop's top frames."""
    rows = ["py-spy under concurrency-8 gRPC load (async client), sampled without pausing the server"
            " (and, where named, with --native, which pauses it for every sample):"]  # fmt: skip
    for e in results:
        found = e.get("result", {}).get("profile")
        if not found:
            continue
        runs = [(e["config"], found)]
        if "native" in found:
            runs.append((f"{e['config']}, --native", found["native"]))
        for label, prof in runs:
            rows += _profile_rows(label, prof, top)
    return rows


def _loop_base(frame: str) -> bool:
    """A frame of the loop's own machinery or of the program around it, under every callback."""
    _, _, where = frame.partition(" (")
    return frame.startswith(("<module> ", "main (gpu_bench.py")) or where.startswith(
        ("asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")
    )


def _profile_rows(label: str, prof: dict[str, Any], top: int) -> list[str]:
    """One profile: the threads' samples, then the event loop's top frames."""
    rows: list[str] = []
    error = f"; {prof['error']}" if "error" in prof else ""
    under = fmt(prof.get("grpc_async_under_profiler"))
    rows += [
        "",
        f"**{label}**: {prof.get('requests')} calls in {prof.get('wall_s')} s at"
        f" {prof.get('rate_hz')} Hz; gRPC p50 / p90 under the profiler {under} ms{error}",
    ]
    threads = prof.get("summary", {}).get("threads", [])
    rows += ["", "| thread | samples | in epoll (an idle loop) | other |", "| --- | ---: | ---: | ---: |"]
    most = max((t["samples"] for t in threads), default=0)
    for t in [t for t in threads if t["samples"] >= 0.05 * most][:10]:
        idle = t.get("idle_share")
        share = "—" if idle is None else f"{idle:.0%}"
        rows.append(f"| {t['name'] or t['tid']} | {t['samples']} | {share} | {t['busy_samples']} |")
    shares = prof.get("summary", {}).get("loop_shares", {})
    if shares.get("busy"):
        kinds = sorted(
            ((k, n) for k, n in shares.items() if k not in ("busy", "idle")), key=lambda kv: -kv[1]
        )
        by_kind = ", ".join(f"{k} {n / shares['busy']:.1%}" for k, n in kinds)
        rows += ["", f"Event loop's busy samples by kind: {by_kind}"]
    loop = next((t for t in threads if t["name"] == "MainThread"), None)
    if loop and loop["busy_samples"]:
        busy = loop["busy_samples"]
        rows += [
            "",
            "Event loop (MainThread), share of its busy samples: self (leaf) | inclusive",
            "",
            "| frame | self | | frame | inclusive |",
            "| --- | ---: | --- | --- | ---: |",
        ]
        inclusive = [(f, n) for f, n in loop["top_inclusive"] if not _loop_base(f)]
        for i in range(min(top, max(len(loop["top_self"]), len(inclusive)))):
            left = loop["top_self"][i] if i < len(loop["top_self"]) else ("", 0)
            right = inclusive[i] if i < len(inclusive) else ("", 0)
            rows.append(f"| {left[0]} | {left[1] / busy:.1%} | | {right[0]} | {right[1] / busy:.1%} |")
    return rows


def c1_breakdown(results: list[dict[str, Any]]) -> list[str]:
    """Where a concurrency-1 gRPC call's time goes: engine and floor back to back and with the
    pause a gRPC closed loop leaves between requests, the server's own stages, and the wire."""
    rows = [
        "Concurrency 1, p50 ms: engine and floor back to back / with a pause between requests; the"
        " server's logged stages; the wire: client send to handler start, handler end to client"
        " receive (wall clocks of one host).",
        "",
        "| config | variant | engine | engine, pause | floor | floor, pause | gRPC | in server: queue /"
        " prepare / engine / heads / total | wire in / out |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in results:
        res = e.get("result", {})
        measured, server = res.get("measured", {}), res.get("server", {})
        for key in sorted(k.removesuffix("/engine") for k in measured if k.endswith("/c1/engine")):
            variant = key.rsplit("/c", 1)[0]
            logged = server.get(f"{variant}-c1-sync", {})

            def p50(label: str, measured: dict[str, Any] = measured, key: str = key) -> str:
                return str(measured.get(f"{key}/{label}", {}).get("p50_ms", "—"))

            stages = " / ".join(
                str(logged.get(f"{s}_p50_ms", "—")) for s in ("queue", "prepare", "engine", "heads", "total")
            )
            wire = f"{logged.get('wire_in_p50_ms', '—')} / {logged.get('wire_out_p50_ms', '—')}"
            cells = [e["config"], variant, p50("engine"), p50("engine_gap"), p50("floor"), p50("floor_gap"),
                     p50("grpc_sync"), stages, wire]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def _config_facts(entry: dict[str, Any]) -> tuple[str, bool]:
    """(precision, adapter per request) of an entry; runs before they were recorded are named
    ``PRECISION-lora`` or ``PRECISION-base``."""
    name = str(entry["config"])
    return str(entry.get("precision", name.split("-")[0])), bool(entry.get("lora", name.endswith("-lora")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="*", type=Path, help="gpu_bench.json files; later ones win")
    parser.add_argument("--pyspy", nargs="+", type=Path, help="raw py-spy records: the event loop's shares")
    args = parser.parse_args()
    for path in args.pyspy or []:
        shares = loop_shares(path.read_text(errors="replace"))
        busy = shares.get("busy", 0)
        print(f"{path.name}: event loop samples {busy + shares.get('idle', 0)}, busy {busy}")
        for kind, n in sorted(shares.items(), key=lambda kv: -kv[1]):
            if kind not in ("busy", "idle"):
                print(f"  {n:6d} {n / busy:6.1%}  {kind}")
    if not args.reports:
        return 0
    merged: dict[str, dict[str, Any]] = {}
    for path in args.reports:
        for e in json.loads(path.read_text())["results"]:
            if "result" in e or e["config"] not in merged:
                merged[e["config"]] = e
    for e in merged.values():
        judge(e)
    print(markdown(list(merged.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
