"""Start a real ``probeserve serve`` process on a free loopback port and wait until it is SERVING.

Used by the tests and by the measuring scripts, which must talk to the real server process.
The server is started with ``--port 0`` and reports the port it bound in its JSON log, so
there is no race for a free port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probeserve_client import ProbeClient, ProbeServeError


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    target: str
    log_path: Path
    # Health statuses seen while waiting, in order, and the status of an Extract sent before
    # the server was SERVING (if the wait got to send one).
    startup_health: list[str] = field(default_factory=list)
    early_extract_code: str | None = None
    startup_s: float = 0.0
    metrics_port: int | None = None

    def metrics(self) -> dict[str, float]:
        """Scrape the server's Prometheus endpoint: {'name{labels}': value}."""
        if self.metrics_port is None:
            raise RuntimeError("the server was started without --metrics-port")
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
        return values

    def log_lines(self) -> list[dict[str, Any]]:
        """The server's JSON log lines so far (vLLM's own plain-text lines are skipped)."""
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue
        return lines

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait up to ``timeout``, then kill. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def _listening(log_path: Path) -> dict[str, Any] | None:
    """The server's "listening" log line, once written."""
    for raw in log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{") and '"listening"' in raw:
            line: dict[str, Any] = json.loads(raw)
            return line
    return None


def start_server(
    *,
    bundle: Path,
    model: Path,
    log_path: Path,
    precision: str = "auto",
    extra_args: tuple[str, ...] = (),
    probe_function: str | None = None,
    timeout_s: float = 600,
    env: dict[str, str] | None = None,
    client_kwargs: dict[str, Any] | None = None,
) -> RunningServer:
    """Start the server and wait until health says SERVING; raises with the log's tail if not.

    ``client_kwargs`` go to the health-polling :class:`ProbeClient` (credentials for TLS).
    """
    client_kwargs = client_kwargs or {}
    cmd = [
        sys.executable, "-m", "probeserve", "serve",
        "--bundle", str(bundle), "--model", str(model), "--precision", precision,
        "--host", "127.0.0.1", "--port", "0", "--log-format", "json", *extra_args,
    ]  # fmt: skip
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env or os.environ.copy()
        )
    deadline = started + timeout_s

    def fail(why: str) -> RuntimeError:
        process.kill()
        process.wait(10)
        return RuntimeError(f"{why}; server log tail:\n{log_path.read_text(errors='replace')[-4000:]}")

    listening = None
    while listening is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.25)
        listening = _listening(log_path)
    if listening is None:
        raise fail("server did not start listening")
    port = int(listening["address"].rsplit(":", 1)[1])
    running = RunningServer(
        process, f"127.0.0.1:{port}", log_path, metrics_port=listening.get("metrics_port")
    )
    with ProbeClient(running.target, timeout=5, retries=0, **client_kwargs) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = client.health()
            except ProbeServeError as error:
                status = error.code.name
            if not running.startup_health or running.startup_health[-1] != status:
                running.startup_health.append(status)
            if status == "SERVING":
                running.startup_s = time.monotonic() - started
                return running
            if status == "NOT_SERVING" and probe_function and running.early_extract_code is None:
                try:
                    client.extract(probe_function, "is the server ready?")
                    running.early_extract_code = "OK"
                except ProbeServeError as error:
                    running.early_extract_code = error.code.name
            time.sleep(0.25)
    raise fail(f"server not SERVING within {timeout_s:.0f}s")
