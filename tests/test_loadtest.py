"""``probeserve-client loadtest`` against real servers: short bounded runs, closed and open loop.

The command runs as its own process (its command line is what users run). Most runs load the
shared session server; the accounting under refusals needs a server of its own with
``--max-in-flight 2``. Tests of the parts without a server come last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from probeserve.launcher import RunningServer, start_server
from probeserve_client import BundleInfo, FunctionInfo, ServerInfo, SlotInfo
from probeserve_client.loadtest import items_from_info
from probeserve_client.loadtest._cli import missing_extras
from probeserve_client.loadtest._report import summary
from tests.support.tiny_model import CORPUS, TinyArtifacts

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "scripts" / "bench" / "loadtest.py"
OUTCOMES = ("offered", "sent", "answered", "errors", "dropped")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loadtest") / "inputs.jsonl"
    lines = [{"function": "book_flight", "utterance": CORPUS[0]}]
    lines += [{"function": "get_weather", "utterance": text} for text in CORPUS[1:5]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def loadtest(target: str, out: Path, *args: str, command: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """Run the command; returns its JSON report and its printed summary."""
    command = command or (sys.executable, "-m", "probeserve_client", "loadtest")
    cmd = [*command, "--target", target, "--out", str(out), "--no-progress", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Summary:") and "Latency distribution:" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report, done.stdout


def check_accounting(report: dict[str, Any], items_per_call: int) -> None:
    """offered = answered + errors + dropped and sent = answered + errors, for calls and items."""
    for unit, per in (("calls", 1), ("items", items_per_call)):
        counts = report[unit]
        assert counts["offered"] == counts["answered"] + counts["errors"] + counts["dropped"], unit
        assert counts["sent"] == counts["answered"] + counts["errors"], unit
        assert counts["offered"] == report["calls"]["offered"] * per, unit
    calls, items = report["calls"], report["items"]
    assert sum(report["call_errors_by_code"].values()) == calls["errors"]
    assert sum(report["errors_by_code"].values()) == items["errors"]
    assert report["latency_ms"]["count"] == calls["answered"]
    windows = report["timeline"]["windows"]
    for key in ("offered", "answered", "errors", "dropped"):
        assert sum(w[key] for w in windows) == calls[key], key
    assert sum(w["items_answered"] for w in windows) == items["answered"]
    if calls["answered"]:
        latency = report["latency_ms"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"]
        assert latency["p99_9"] <= latency["max"]
        assert sum(b["count"] for b in report["histogram_ms"]) == calls["answered"]
        assert report["throughput"]["calls_per_s"] > 0


def check_no_errors(report: dict[str, Any]) -> None:
    assert report["errors_by_code"] == {} and report["call_errors_by_code"] == {}
    assert report["calls"]["errors"] == 0 and report["items"]["errors"] == 0
    assert report["calls"]["answered"] > 0


@pytest.mark.parametrize(
    ("mode", "extra", "per_call"),
    [("unary", (), 1), ("batch", ("--batch-size", "3"), 3), ("stream", (), 1)],
)
def test_closed_loop_bounded_by_requests(
    server: RunningServer, inputs: Path, tmp_path: Path, mode: str, extra: tuple[str, ...], per_call: int
) -> None:
    report, printed = loadtest(
        server.target, tmp_path / "out.json", "--inputs", str(inputs),
        "--mode", mode, *extra, "--concurrency", "4", "--requests", "24", "--duration", "20", "--warmup", "4",
    )  # fmt: skip
    assert report["loop"] == "closed" and report["mode"] == mode and report["concurrency"] == 4
    assert report["warmup"] == {"calls": 4, "errors": 0}
    assert report["calls"]["offered"] == 24 and report["calls"]["dropped"] == 0
    assert report["inputs"] == {"source": str(inputs), "count": 5}
    assert report["late"] is None and report["rate_per_s"] is None
    check_accounting(report, per_call)
    check_no_errors(report)
    assert report["throughput"]["items_per_s"] == pytest.approx(
        report["throughput"]["calls_per_s"] * per_call, rel=0.01
    )
    assert "[OK] 24 responses" in printed


def test_closed_loop_bounded_by_duration(server: RunningServer, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    report, _ = loadtest(server.target, out, "--inputs", str(inputs), "--concurrency=2", "--duration=1.5")
    assert 1.5 <= report["elapsed_s"] < 5
    check_accounting(report, 1)
    check_no_errors(report)


def test_open_loop_without_inputs_asks_the_server(server: RunningServer, tmp_path: Path) -> None:
    """No --inputs: one utterance per function of the bundle, from GetInfo; --plot draws a PNG."""
    report, printed = loadtest(
        server.target, tmp_path / "out.json",
        "--rate", "40", "--max-outstanding", "8", "--duration", "2", "--requests", "60", "--warmup", "2",
        "--plot", str(tmp_path / "out.png"),
    )  # fmt: skip
    assert report["loop"] == "open" and report["rate_per_s"] == 40 and report["concurrency"] is None
    assert report["inputs"]["count"] == 2 and report["inputs"]["source"].startswith("GetInfo")
    calls = report["calls"]
    # About 80 arrivals in 2 s, capped at 60: the run ends at whichever bound comes first.
    assert 20 <= calls["offered"] <= 60
    assert 0 <= report["late"] <= calls["sent"]
    check_accounting(report, 1)
    check_no_errors(report)
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "open loop, 40/s Poisson, at most 8 outstanding" in printed


def test_benchmark_shim_runs_the_client_command(server: RunningServer, inputs: Path, tmp_path: Path) -> None:
    report, _ = loadtest(
        server.target, tmp_path / "out.json", "--inputs", str(inputs), "--requests", "5",
        command=(sys.executable, str(SHIM)),
    )  # fmt: skip
    assert report["calls"]["answered"] == 5
    check_accounting(report, 1)


@pytest.fixture(scope="module")
def small_server(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server that admits two items at a time: more concurrent unary calls are refused."""
    running = start_server(
        bundle=tiny.bundle_dir,
        model=tiny.model_dir,
        precision="fp32",
        log_path=tmp_path_factory.mktemp("small") / "server.log",
        extra_args=("--max-in-flight", "2", "--eager"),
        timeout_s=300,
    )
    yield running
    running.stop()


def test_counts_add_up_when_calls_are_refused_and_dropped(
    small_server: RunningServer, inputs: Path, tmp_path: Path
) -> None:
    """Open loop faster than two in flight can answer: refusals, drops, and every call counted once."""
    # A batch of 4 takes both of the server's slots, so any two batches that overlap: one refused.
    report, printed = loadtest(
        small_server.target, tmp_path / "refused.json", "--inputs", str(inputs), "--mode", "batch",
        "--batch-size", "4", "--rate", "150", "--max-outstanding", "4", "--duration", "2", "--warmup", "0",
    )  # fmt: skip
    check_accounting(report, 4)
    refused = report["call_errors_by_code"].get("RESOURCE_EXHAUSTED", 0)
    assert refused > 0 and set(report["call_errors_by_code"]) == {"RESOURCE_EXHAUSTED"}
    assert report["errors_by_code"] == {"RESOURCE_EXHAUSTED": 4 * refused}  # a refused call fails its items
    assert report["calls"]["answered"] > 0 and report["in_band_errors_by_code"] == {}
    assert "[RESOURCE_EXHAUSTED]" in printed

    # One outstanding call at a time: no refusals, but arrivals during a call are dropped.
    report, printed = loadtest(
        small_server.target, tmp_path / "dropped.json", "--inputs", str(inputs),
        "--rate", "150", "--max-outstanding", "1", "--duration", "2", "--warmup", "0",
    )  # fmt: skip
    check_accounting(report, 1)
    assert report["calls"]["dropped"] > 0 and report["calls"]["errors"] == 0
    assert f"{report['calls']['dropped']} dropped" in printed


# -- without a server ----------------------------------------------------------------------------


def test_utterances_from_info_name_each_function_and_its_slots() -> None:
    slots = tuple(SlotInfo(n, "str", False, "") for n in ("acceleration", "initial_velocity", "time"))
    functions = (FunctionInfo("final_velocity", "", slots), FunctionInfo("ping", "", ()))
    info = ServerInfo("m", "fp32", (BundleInfo("demo", "1", 8, functions),), 512, "0.1.0", "vllm")
    items = items_from_info(info)
    assert [(i.function, i.utterance) for i in items] == [
        ("final_velocity", "final velocity with acceleration, initial velocity and time"),
        ("ping", "ping"),
    ]
    assert [i.bundle for i in items_from_info(info, "demo")] == ["demo", "demo"]
    with pytest.raises(ValueError, match="no bundle 'other'"):
        items_from_info(info, "other")


def test_summary_renders_a_run_without_answers() -> None:
    counts = {"offered": 3, "sent": 3, "answered": 0, "errors": 3, "dropped": 0}
    report = {
        "target": "t:1", "mode": "unary", "loop": "closed", "concurrency": 1, "rate_per_s": None,
        "max_outstanding": None, "batch_size": 1, "elapsed_s": 0.1, "calls": counts, "items": counts,
        "late": None, "throughput": {"calls_per_s": 0.0, "items_per_s": 0.0, "offered_calls_per_s": 30.0},
        "latency_ms": {"count": 0, "min": None, "mean": None, "max": None}, "histogram_ms": [],
        "errors_by_code": {"UNAVAILABLE": 3}, "call_errors_by_code": {"UNAVAILABLE": 3},
        "in_band_errors_by_code": {},
    }  # fmt: skip
    text = summary(report)
    assert "3 calls offered: 0 answered, 3 errors, 0 dropped" in text
    assert "(no answered calls)" in text and "[UNAVAILABLE] 3 responses" in text


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "matplotlib" else real(n))
    assert missing_extras(plot=False) == []
    assert missing_extras(plot=True) == ["matplotlib"]
