"""The GPU benchmark's bookkeeping (``scripts/bench/gpu_report.py``; no GPU, no engine): pairing
the client's stamps with the server's log lines, the concurrency-1 breakdown table, and a short
run of scripts/bench/wake_latency.py, whose figures explain that breakdown's wire times."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


@pytest.fixture(scope="module")
def gpu_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_report", BENCH / "gpu_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module
    spec.loader.exec_module(module)
    return module


BASE = 1_789_993_600.0  # 2026-09-21T12:26:40Z, as time.time() gives it


def _line(request_id: str, logged: str, total_ms: float, engine_ms: float) -> dict[str, object]:
    return {"event": "extract", "request_id": request_id, "timestamp": logged, "total_ms": total_ms,
            "engine_ms": engine_ms, "heads_ms": 1.0, "queue_ms": 0.5, "prepare_ms": 0.25}  # fmt: skip


def test_wire_times_split_a_call_around_the_server(gpu_report: ModuleType) -> None:
    # Logged at 12:00:00.020 after 10 ms in the server: the handler began at .010. Sent at
    # .008 and received at .023: 2 ms on the way in, 3 ms on the way out.
    base = BASE
    logged = "2026-09-21T12:26:40.020000Z"
    wire_in, wire_out = gpu_report.wire_times(_line("a", logged, 10.0, 8.0), (base + 0.008, base + 0.023))
    assert wire_in == pytest.approx(2.0, abs=1e-3)
    assert wire_out == pytest.approx(3.0, abs=1e-3)
    assert gpu_report.wire_times(_line("a", logged, 10.0, 8.0), None) is None
    assert gpu_report.wire_times({"request_id": "a"}, (base, base)) is None


def test_breakdown_groups_lines_and_renders_the_c1_table(gpu_report: ModuleType, tmp_path: Path) -> None:
    base = BASE
    lines = [
        _line("w5-si5-c1-sync-r0-0", "2026-09-21T12:26:40.020000Z", 10.0, 8.0),
        _line("w5-si5-c1-sync-r1-0", "2026-09-21T12:26:41.020000Z", 12.0, 9.0),
        _line("w5-si5-c1-sync-r1-1", "2026-09-21T12:26:42.020000Z", 14.0, 10.0),
        _line("warm-sync-0", "2026-09-21T12:26:39.000000Z", 99.0, 99.0),  # warm-up: left out
    ]
    log = tmp_path / "child.log"
    log.write_text("vLLM says hello\n" + "".join(json.dumps(x) + "\n" for x in lines))
    stamps = {  # 1 ms in, 2 ms out for each
        "w5-si5-c1-sync-r0-0": (base + 0.020 - 0.010 - 0.001, base + 0.022),
        "w5-si5-c1-sync-r1-0": (base + 1.020 - 0.012 - 0.001, base + 1.022),
        "w5-si5-c1-sync-r1-1": (base + 2.020 - 0.014 - 0.001, base + 2.022),
    }
    found = gpu_report.server_breakdown(log, stamps)
    assert set(found) == {"w5-si5-c1-sync"}
    group = found["w5-si5-c1-sync"]
    assert group["engine_p50_ms"] == 9.0 and group["total_p50_ms"] == 12.0
    assert group["wire_in_p50_ms"] == pytest.approx(1.0, abs=0.01)
    assert group["wire_out_p50_ms"] == pytest.approx(2.0, abs=0.01)

    p50s = {"engine": 8.5, "engine_gap": 9.5, "floor": 9.4, "floor_gap": 10.1, "grpc_sync": 13.4}
    measured = {f"w5-si5/c1/{k}": {"p50_ms": v, "p90_ms": v} for k, v in p50s.items()}
    entry = {"config": "fp16-base", "result": {"measured": measured, "server": found}}
    assert gpu_report.c1_breakdown([entry])[-1] == (
        "| fp16-base | w5-si5 | 8.5 | 9.5 | 9.4 | 10.1 | 13.4 | 0.5 / 0.25 / 9.0 / 1.0 / 12.0 | 1.0 / 2.0 |"
    )


def test_wake_latency_runs_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "wake_latency.py"), "--n", "5", "--gaps-ms", "0,1", "--wait-ms", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("socket_us", "grpc_us"):
        assert set(report[key]) == {"gap_0ms", "gap_1ms"}
        assert all(v > 0 for v in report[key].values())
    assert report["grpc_worker_wait_2ms_us"]["gap_0ms"] >= 2000  # it includes the worker's sleep
    assert report["sleep_2ms_us"] >= 2000
    assert int(report["host"]["cpus"]) >= 1
