"""The load test's picture: latency percentiles over time above, calls per second below.

Made from the report alone (``timeline``), with matplotlib from the ``loadtest`` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probeserve_client.loadtest._report import describe_load

COLORS = {"p50": "#1f77b4", "p90": "#ff7f0e", "p99": "#d62728", "answered": "#2ca02c", "errors": "#d62728"}
DROPPED_COLOR = "#9e9e9e"
LOG_SCALE_RATIO = 20  # latency axis goes logarithmic when the slowest window is this much slower


def plot(report: dict[str, Any], path: Path) -> None:
    """Write the PNG: p50/p90/p99 per window; calls answered, failed and dropped a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = report["timeline"]["window_s"]
    windows = report["timeline"]["windows"]
    spans = [max(w["end_s"] - w["start_s"], 1e-9) for w in windows]
    centres = [w["start_s"] + span / 2 for w, span in zip(windows, spans, strict=True)]
    calls = report["calls"]
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 7), height_ratios=(3, 2), layout="constrained"
    )
    fig.suptitle(
        f"probeserve load test — {describe_load(report)}\n"
        f"{calls['offered']} calls offered: {calls['answered']} answered, {calls['errors']} errors, "
        f"{calls['dropped']} dropped in {report['elapsed_s']:.1f} s; "
        f"server {report['server']['model']} ({report['server']['precision']})",
        fontsize=10,
    )

    shown: list[float] = []
    for key in ("p50", "p90", "p99"):
        points = [
            (x, w[f"{key}_ms"]) for x, w in zip(centres, windows, strict=True) if w[f"{key}_ms"] is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            top.plot(xs, ys, marker="o", markersize=3, color=COLORS[key], label=f"{key} per {window} s")
            shown += ys
    latency = report["latency_ms"]
    for key, style in (("p50", ":"), ("p99", "--")):
        if latency[key] is not None:
            top.axhline(latency[key], color=COLORS[key], linestyle=style, linewidth=1,
                        label=f"{key} of the whole run: {latency[key]:.1f} ms")  # fmt: skip
    if shown and min(shown) > 0 and max(shown) / min(shown) > LOG_SCALE_RATIO:
        top.set_yscale("log")
    elif shown:
        top.set_ylim(0, max(shown) * 1.3)
    top.set_ylabel("latency of answered calls (ms)")
    top.grid(True, alpha=0.3)
    if shown:
        top.legend(loc="upper left", fontsize=8, ncols=2)
    else:
        top.text(0.5, 0.5, "no answered calls", ha="center", va="center", transform=top.transAxes)

    def rate(key: str) -> list[float]:
        return [w[key] / span for w, span in zip(windows, spans, strict=True)]

    answered, errors, dropped, offered = rate("answered"), rate("errors"), rate("dropped"), rate("offered")
    widths = [span * 0.8 for span in spans]
    bottom.bar(centres, answered, width=widths, color=COLORS["answered"], label="answered")
    bottom.bar(centres, errors, width=widths, bottom=answered, color=COLORS["errors"], label="errors")
    stacked = [a + e for a, e in zip(answered, errors, strict=True)]
    if any(dropped):
        bottom.bar(centres, dropped, width=widths, bottom=stacked, color=DROPPED_COLOR, label="dropped")
    edges = [w["start_s"] for w in windows] + [windows[-1]["end_s"]]
    bottom.stairs(offered, edges, baseline=None, color="black", linewidth=1, label="offered")
    if report["rate_per_s"]:
        bottom.axhline(report["rate_per_s"], color="black", linestyle="--", linewidth=0.8,
                       label=f"--rate {report['rate_per_s']:g}/s")  # fmt: skip
    highest = max(
        [*offered, *(s + d for s, d in zip(stacked, dropped, strict=True)), report["rate_per_s"] or 0]
    )
    bottom.set_ylim(0, max(highest, 1) * 1.35)
    bottom.set_ylabel("calls per second")
    bottom.set_xlabel(
        "seconds since the run began (calls counted in the window they ended in; offered: arrived)"
    )
    bottom.set_xlim(0, edges[-1])
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.legend(loc="upper left", fontsize=8, ncols=5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
