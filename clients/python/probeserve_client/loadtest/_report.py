"""The load test's report: a JSON-able dict, and a terminal summary in the style of ghz.

The summary and the plot are made from the report alone, so a saved ``--out`` file can be
rendered again. Its accounting, for calls and for items alike::

    offered = answered + errors + dropped      sent = answered + errors

(``dropped``: open-loop arrivals that found ``max_outstanding`` calls in flight and were never
sent; always 0 in a closed loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from probeserve_client._types import ServerInfo
from probeserve_client.loadtest._run import LoadRun, LoadSettings, Recorder, Second

PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
HISTOGRAM_BUCKETS = 10
BAR = "∎"
BAR_WIDTH = 40
MAX_WINDOWS = 120  # the timeline's resolution: 1 s windows, wider on runs longer than 2 minutes
OUTCOMES = ("offered", "sent", "answered", "errors", "dropped")


def _ms(us: float) -> float:
    return round(us / 1e3, 3)


def _percentile_key(q: float) -> str:
    return "p" + f"{q:g}".replace(".", "_")


def latency_ms(histogram: Any) -> dict[str, float | int | None]:
    """Count, min, mean, percentiles and max of the answered calls, in milliseconds."""
    count = int(histogram.get_total_count())
    keys = ["min", "mean", *(_percentile_key(q) for q in PERCENTILES), "max"]
    if count == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    values: dict[str, float | int | None] = {"count": count, "min": _ms(histogram.get_min_value())}
    values["mean"] = _ms(histogram.get_mean_value())
    for q in PERCENTILES:
        values[_percentile_key(q)] = _ms(histogram.get_value_at_percentile(q))
    values["max"] = _ms(histogram.get_max_value())
    return values


def histogram_ms(histogram: Any, buckets: int = HISTOGRAM_BUCKETS) -> list[dict[str, float | int]]:
    """Answered calls in ``buckets`` equal-width latency ranges from the fastest to the slowest."""
    if histogram.get_total_count() == 0:
        return []
    low, high = histogram.get_min_value(), histogram.get_max_value()
    width = (high - low) / buckets
    counts = [0] * buckets
    for step in histogram.get_recorded_iterator():
        value = min(max(step.value_iterated_to, low), high)
        index = buckets - 1 if width == 0 else min(buckets - 1, int((value - low) / width))
        counts[index] += step.count_added_in_this_iter_step
    return [
        {"from_ms": _ms(low + i * width), "to_ms": _ms(low + (i + 1) * width), "count": counts[i]}
        for i in range(buckets)
    ]


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def timeline(recorder: Recorder, elapsed_s: float) -> dict[str, Any]:
    """Per window of the run: calls offered (by arrival), answered and failed (by when they ended),
    dropped, and the answered calls' latency percentiles. Windows are 1 s (wider on runs longer
    than two minutes); the last one takes the run's remainder."""
    window = max(1, math.ceil(elapsed_s / MAX_WINDOWS))
    count = max(1, round(elapsed_s / window))
    parts: list[list[Second]] = [[] for _ in range(count)]
    for second, part in recorder.seconds.items():
        parts[min(count - 1, second // window)].append(part)
    windows = []
    for i, group in enumerate(parts):
        start = i * window
        end = max(elapsed_s, start + window / 2) if i == count - 1 else start + window
        latencies = sorted(x for part in group for x in part.latencies_ms)
        entry: dict[str, Any] = {
            "start_s": start,
            "end_s": round(end, 3),
            "offered": sum(p.offered for p in group),
            "answered": len(latencies),
            "items_answered": sum(p.items_answered for p in group),
            "errors": sum(p.errors for p in group),
            "dropped": sum(p.dropped for p in group),
        }
        for q in (50.0, 90.0, 99.0):
            entry[f"{_percentile_key(q)}_ms"] = round(_nearest_rank(latencies, q), 3) if latencies else None
        windows.append(entry)
    return {"window_s": window, "windows": windows}


def build_report(
    *,
    target: str,
    settings: LoadSettings,
    server: ServerInfo,
    inputs_source: str,
    inputs_count: int,
    run: LoadRun,
) -> dict[str, Any]:
    """The JSON report of a run (see the module's docstring for its accounting)."""
    rec, elapsed = run.measured, run.elapsed_s
    open_loop = settings.loop == "open"

    def per_s(n: int) -> float:
        return round(n / elapsed, 3) if elapsed > 0 else 0.0

    return {
        "target": target,
        "mode": settings.mode,
        "loop": settings.loop,
        "concurrency": None if open_loop else settings.concurrency,
        "rate_per_s": settings.rate if open_loop else None,
        "max_outstanding": settings.max_outstanding if open_loop else None,
        "batch_size": settings.per_call,
        "bundle": settings.bundle or None,
        "server": {
            "model": server.model,
            "precision": server.precision,
            "server_version": server.server_version,
            "engine": server.engine_version,
        },
        "inputs": {"source": inputs_source, "count": inputs_count},
        "limits": {
            "duration_s": settings.duration_s,
            "requests": settings.requests,
            "timeout_s": settings.timeout_s,
        },
        "warmup": {"calls": run.warmup.calls["sent"], "errors": run.warmup.calls["errors"]},
        "elapsed_s": round(elapsed, 3),
        "calls": {k: rec.calls[k] for k in OUTCOMES},
        "items": {k: rec.items[k] for k in OUTCOMES},
        "late": rec.late if open_loop else None,
        "throughput": {
            "calls_per_s": per_s(rec.calls["answered"]),
            "items_per_s": per_s(rec.items["answered"]),
            "offered_calls_per_s": per_s(rec.calls["offered"]),
        },
        "latency_ms": latency_ms(rec.histogram),
        "histogram_ms": histogram_ms(rec.histogram),
        "errors_by_code": dict(sorted(rec.item_errors.items())),
        "call_errors_by_code": dict(sorted(rec.call_errors.items())),
        "in_band_errors_by_code": dict(sorted(rec.in_band_errors.items())),
        "timeline": timeline(rec, elapsed),
        "hdr_histogram_us": rec.histogram.encode().decode("ascii") if rec.calls["answered"] else None,
    }


def describe_load(report: dict[str, Any]) -> str:
    """One line: what calls were made, how paced, against what."""
    mode = f"batches of {report['batch_size']}" if report["mode"] == "batch" else f"{report['mode']} calls"
    if report["loop"] == "open":
        pace = (
            f"open loop, {report['rate_per_s']:g}/s Poisson, at most {report['max_outstanding']} outstanding"
        )
    else:
        pace = f"closed loop, concurrency {report['concurrency']}"
    return f"{report['target']}: {mode}, {pace}"


def _row(label: str, value: str) -> str:
    return f"  {label + ':':<15}{value}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def summary(report: dict[str, Any]) -> str:
    """The terminal report: counts, rate, latency, a text histogram, status codes."""
    calls, items, lat, rate = report["calls"], report["items"], report["latency_ms"], report["throughput"]
    lines = [
        "Summary:",
        _row("Target", describe_load(report)),
        _row(
            "Count",
            f"{calls['offered']} calls offered: {calls['answered']} answered, {calls['errors']} errors, "
            f"{calls['dropped']} dropped",
        ),
        _row("Total", f"{report['elapsed_s']:.2f} s"),
        _row("Slowest", _fmt_ms(lat["max"])),
        _row("Fastest", _fmt_ms(lat["min"])),
        _row("Average", _fmt_ms(lat["mean"])),
        _row(
            "Requests/sec", f"{rate['calls_per_s']:.2f} answered ({rate['offered_calls_per_s']:.2f} offered)"
        ),
    ]
    if report["batch_size"] > 1 or report["mode"] != "unary":
        lines.append(
            _row(
                "Items",
                f"{items['offered']} offered: {items['answered']} answered, {items['errors']} errors, "
                f"{items['dropped']} dropped; {rate['items_per_s']:.2f} answered/s",
            )
        )
    if report["late"] is not None:
        lines.append(_row("Late", f"{report['late']} calls sent behind their scheduled time"))

    lines += ["", "Response time histogram (answered calls):"]
    buckets = report["histogram_ms"]
    if not buckets:
        lines.append("  (no answered calls)")
    else:
        most = max(b["count"] for b in buckets) or 1
        label_width = max(len(f"{b['to_ms']:.3f}") for b in buckets)
        count_width = max(len(str(b["count"])) for b in buckets)
        for b in buckets:
            bar = BAR * math.ceil(b["count"] / most * BAR_WIDTH) if b["count"] else ""
            lines.append(f"  {b['to_ms']:>{label_width}.3f} ms [{b['count']:>{count_width}}] |{bar}")

    lines += ["", "Latency distribution:"]
    if lat["count"]:
        for q in PERCENTILES:
            lines.append(f"  {q:g} % in {_fmt_ms(lat[_percentile_key(q)])}")
    else:
        lines.append("  (no answered calls)")

    codes = {"OK": calls["answered"], **report["call_errors_by_code"]}
    width = max(len(code) for code in codes) + 2
    lines += ["", "Status code distribution (calls):"]
    lines += [f"  {'[' + code + ']':<{width}} {n} responses" for code, n in codes.items() if n]
    if report["in_band_errors_by_code"]:
        lines += ["", "Item errors inside answered calls:"]
        lines += [f"  [{code}] {n} items" for code, n in report["in_band_errors_by_code"].items()]
    return "\n".join(lines)


def progress_line(recorder: Recorder, elapsed_s: float, duration_s: float) -> str:
    """One line about the run so far, for the terminal while it runs."""
    calls = recorder.calls
    recent = recorder.seconds.get(max(0, int(elapsed_s) - 1))
    p50 = None
    if recent is not None and recent.latencies_ms:
        p50 = _nearest_rank(sorted(recent.latencies_ms), 50.0)
    return (
        f"[{min(elapsed_s, duration_s):5.1f}/{duration_s:g} s] offered {calls['offered']}  "
        f"answered {calls['answered']}  errors {calls['errors']}  dropped {calls['dropped']}  "
        f"in flight {recorder.in_flight}  p50 (last s) {_fmt_ms(p50)}"
    )
