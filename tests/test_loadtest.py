"""scripts/bench/loadtest.py against the session's server: short bounded runs, closed and open loop.

The script runs as its own process (its command line is what users run); it talks to the shared
test server, so no engine is started here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from probeserve.launcher import RunningServer
from tests.support.tiny_model import CORPUS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench" / "loadtest.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loadtest") / "inputs.jsonl"
    lines = [{"function": "book_flight", "utterance": CORPUS[0]}]
    lines += [{"function": "get_weather", "utterance": text} for text in CORPUS[1:5]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def loadtest(server: RunningServer, inputs: Path, out: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, str(SCRIPT), "--target", server.target, "--inputs", str(inputs), "--out", str(out)]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "throughput:" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def check_counts(report: dict[str, Any], items_per_call: int) -> None:
    calls, items = report["calls"], report["items"]
    assert calls["sent"] == calls["ok"] + calls["failed"]
    assert items["sent"] == items["ok"] + items["failed"]
    assert items["sent"] == calls["sent"] * items_per_call
    assert report["errors_by_code"] == {} and report["call_errors_by_code"] == {}
    assert calls["failed"] == 0 and items["failed"] == 0 and calls["ok"] > 0
    latency = report["latency_ms"]
    assert latency["count"] == calls["ok"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["throughput"]["calls_per_s"] > 0
    assert report["throughput"]["items_per_s"] == pytest.approx(
        report["throughput"]["calls_per_s"] * items_per_call, rel=0.01
    )


@pytest.mark.parametrize(
    ("mode", "extra", "per_call"),
    [("unary", (), 1), ("batch", ("--batch-size", "3"), 3), ("stream", (), 1)],
)
def test_closed_loop_bounded_by_requests(
    server: RunningServer, inputs: Path, tmp_path: Path, mode: str, extra: tuple[str, ...], per_call: int
) -> None:
    report = loadtest(
        server, inputs, tmp_path / "out.json",
        "--mode", mode, *extra, "--concurrency", "4", "--requests", "24", "--duration", "20", "--warmup", "4",
    )  # fmt: skip
    assert report["loop"] == "closed" and report["mode"] == mode and report["concurrency"] == 4
    assert report["warmup"] == {"calls": 4, "failed_calls": 0}
    assert report["calls"]["sent"] == 24
    assert report["inputs"]["count"] == 5
    assert report["open_loop"] is None
    check_counts(report, per_call)


def test_closed_loop_bounded_by_duration(server: RunningServer, inputs: Path, tmp_path: Path) -> None:
    report = loadtest(server, inputs, tmp_path / "out.json", "--concurrency", "2", "--duration", "1.5")
    assert 1.5 <= report["elapsed_s"] < 5
    check_counts(report, 1)


def test_open_loop_counts_arrivals(server: RunningServer, inputs: Path, tmp_path: Path) -> None:
    report = loadtest(
        server, inputs, tmp_path / "out.json",
        "--rate", "40", "--max-outstanding", "8", "--duration", "2", "--requests", "60", "--warmup", "2",
    )  # fmt: skip
    assert report["loop"] == "open" and report["rate_per_s"] == 40 and report["concurrency"] is None
    arrivals = report["open_loop"]
    assert arrivals["scheduled"] == arrivals["sent"] + arrivals["dropped"]
    assert arrivals["sent"] == report["calls"]["sent"]
    assert 0 <= arrivals["late"] <= arrivals["sent"]
    # About 80 arrivals in 2 s, capped at 60: the run ends at whichever bound comes first.
    assert 20 <= arrivals["scheduled"] <= 60
    check_counts(report, 1)
