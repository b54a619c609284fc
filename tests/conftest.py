"""Shared fixtures: a tiny model and bundle made on the spot, and ONE real server per test session.

The server is the real ``probeserve serve`` process (real vLLM engine, real gRPC on loopback);
tests talk to it through the real client. It runs at fp32 so that its answers can be compared
exactly with the transformers+peft reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from probeserve.bundle import Bundle, load_bundle
from probeserve_client import ProbeClient, ProbeServeError
from tests.support.tiny_model import TinyArtifacts, make_all

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    target: str
    log_path: Path
    # What the fixture saw while waiting: health statuses in order, and the status code of an
    # Extract sent before the server was SERVING (if it got to send one).
    startup_health: list[str] = field(default_factory=list)
    early_extract_code: str | None = None

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue
        return lines


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    return make_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny: TinyArtifacts) -> Bundle:
    return load_bundle(tiny.bundle_dir)


def _listening_port(log_path: Path) -> int | None:
    for raw in log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{") and '"listening"' in raw:
            return int(json.loads(raw)["address"].rsplit(":", 1)[1])
    return None


def start_server(tiny: TinyArtifacts, log_path: Path, *extra: str, precision: str = "fp32") -> RunningServer:
    """Start ``probeserve serve`` on a free loopback port and wait until health says SERVING."""
    cmd = [
        sys.executable, "-m", "probeserve", "serve",
        "--bundle", str(tiny.bundle_dir), "--model", str(tiny.model_dir),
        "--precision", precision, "--host", "127.0.0.1", "--port", "0",
        "--log-format", "json", *extra,
    ]  # fmt: skip
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy()
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    port = None
    while port is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        port = _listening_port(log_path)
    if port is None:
        process.kill()
        raise RuntimeError(f"server did not listen; log:\n{log_path.read_text()[-4000:]}")
    running = RunningServer(process, f"127.0.0.1:{port}", log_path)
    with ProbeClient(running.target, timeout=5, retries=0) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = client.health()
            except ProbeServeError as error:
                status = error.code.name
            if not running.startup_health or running.startup_health[-1] != status:
                running.startup_health.append(status)
            if status == "SERVING":
                return running
            if status == "NOT_SERVING" and running.early_extract_code is None:
                try:
                    client.extract("get_weather", "rain in Oslo")
                    running.early_extract_code = "OK"
                except ProbeServeError as error:
                    running.early_extract_code = error.code.name
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server not SERVING in {STARTUP_TIMEOUT_S}s; log:\n{log_path.read_text()[-4000:]}")


def stop_server(server: RunningServer, timeout: float = 60) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@pytest.fixture(scope="session")
def server(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tiny, tmp_path_factory.mktemp("server") / "server.log")
    yield running
    stop_server(running)


@pytest.fixture
def client(server: RunningServer) -> Iterator[ProbeClient]:
    with ProbeClient(server.target, timeout=60) as c:
        yield c
