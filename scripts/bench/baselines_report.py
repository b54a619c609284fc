"""The side-by-side benchmark's report: agreement between the systems, ratios, the table.

``baselines.py`` measures; this module judges what it measured (every system's answers against
the engine's, since a benchmark of wrong answers is worthless) and renders the Markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from common import Utterance

Canonical = list[dict[str, Any]]  # one dict per slot: slot, present, value, span, p


def disagreements(
    baseline: list[Canonical], other: list[Canonical], items: Sequence[Utterance]
) -> dict[str, Any]:
    """Slots whose presence, value or token span differ; max presence-probability difference."""
    differ: list[dict[str, Any]] = []
    max_p = 0.0
    for index, (want, got) in enumerate(zip(baseline, other, strict=True)):
        for w, g in zip(want, got, strict=True):
            if w["slot"] != g["slot"]:
                raise ValueError(f"input {index}: slot order differs ({w['slot']} vs {g['slot']})")
            max_p = max(max_p, abs(w["p"] - g["p"]))
            if (w["present"], w["value"], w["span"]) != (g["present"], g["value"], g["span"]):
                differ.append({"input": index, "function": items[index].function, "slot": w["slot"],
                               "want": [w["value"], w["span"]], "got": [g["value"], g["span"]]})  # fmt: skip
    return {
        "slots": len(differ),
        "inputs": len({d["input"] for d in differ}),
        "max_presence_probability_diff": round(max_p, 6),
        "list": differ,
    }


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x is not None and y else None


def analyse(report: dict[str, Any]) -> None:
    """Add agreement, ratios against (a) and the issue's checks to ``report`` in place."""
    systems = report["systems"]
    items = [Utterance(**i) for i in report["inputs"]]
    levels = [str(c) for c in report["settings"]["concurrency"]]
    base_key = "a" if "a" in systems else next(iter(systems))
    baseline = systems[base_key]["runs"][levels[0]]["results"]
    report["agreement_baseline"] = f"({base_key}) at concurrency {levels[0]}"
    top = levels[-1]
    for system in systems.values():
        for level, run in system["runs"].items():
            run["disagreements"] = disagreements(baseline, run["results"], items)
            if "a" in systems:
                a_run = systems["a"]["runs"][level]
                run["p50_over_a"] = _ratio(run["p50_ms"], a_run["p50_ms"])
                run["items_per_s_over_a"] = _ratio(run["items_per_s"], a_run["items_per_s"])
    checks: dict[str, Any] = {}
    if "a" in systems and "b" in systems:
        b1, bt = systems["b"]["runs"][levels[0]], systems["b"]["runs"][top]
        checks[f"server p50 at c={levels[0]} / engine p50 <= 1.05"] = {
            "ratio": b1["p50_over_a"], "pass": b1["p50_over_a"] is not None and b1["p50_over_a"] <= 1.05,
        }  # fmt: skip
        checks[f"server items/s at c={top} / engine items/s >= 0.95"] = {
            "ratio": bt["items_per_s_over_a"],
            "pass": bt["items_per_s_over_a"] is not None and bt["items_per_s_over_a"] >= 0.95,
        }
    for other in ("c", "d"):
        if "b" in systems and other in systems:
            for level in levels:
                b, o = systems["b"]["runs"][level], systems[other]["runs"][level]
                checks[f"server vs ({other}) at c={level}"] = {
                    "p50_ratio": _ratio(b["p50_ms"], o["p50_ms"]),
                    "items_per_s_ratio": _ratio(b["items_per_s"], o["items_per_s"]),
                }
    checks["answers agree with the baseline"] = all(
        run["disagreements"]["slots"] == 0 for s in systems.values() for run in s["runs"].values()
    )
    report["checks"] = checks


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"Inputs: {len(report['inputs'])} utterances (seed {s['seed']}); precision {s['precision']}; "
        f"LoRA {s['lora_mode']} for (a)-(c), peft adapter for (d); "
        f"warm-up {s['warmup']} + one wave.",
        "",
        "| system | conc. | p50 ms | p90 ms | items/s | p50 / (a) | items/s / (a) | RSS MiB | PSS MiB "
        "| slots differing |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, system in report["systems"].items():
        mem = system["memory_after_warmup"]
        for level, run in system["runs"].items():
            how = " (batched)" if run["how"] == "batched" else ""
            lines.append(
                f"| ({key}) {system['name']} | {level}{how} | {run['p50_ms']:.1f} | {run['p90_ms']:.1f} "
                f"| {run['items_per_s']:.3f} | {_fmt(run.get('p50_over_a'), 3)} "
                f"| {_fmt(run.get('items_per_s_over_a'), 3)} | {mem['rss_mib']:.0f} | {mem['pss_mib']:.0f} "
                f"| {run['disagreements']['slots']} |"
            )
    lines.append("")
    for name, value in report["checks"].items():
        lines.append(f"- {name}: {json.dumps(value)}")
    loads = ", ".join(
        f"({k}) {s['load_average_before'][0]}→{s['load_average_after'][0]}"
        for k, s in report["systems"].items()
    )
    lines.append(f"- 1-min load average before→after each system (2 cores): {loads}")
    return "\n".join(lines)
