"""Serve the tiny test model for tests that are not pytest's: the TypeScript SDK's (``npm test``).

    python -m tests.support.serve_tiny [--max-in-flight N ...]   # from the repository root

Makes the tiny model and its packed bundle in a temporary directory (seconds, no downloads),
starts a real ``probeserve serve`` on it (fp32, the adapter merged, a loopback port of its own
choosing) exactly as the pytest session server is started, prints one JSON line
``{"target": "127.0.0.1:PORT", "log": PATH, "bundle": DIR}`` once it is SERVING (``bundle``: the
served bundle's directory, for LoadBundle calls), and serves until its stdin
closes or it gets SIGTERM/SIGINT; then it stops the server and removes the directory. A caller
that dies closes the pipe, so the server never outlives it. Arguments go to ``probeserve serve``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from probeserve.launcher import start_server
from tests.support.tiny_model import make_all

STARTUP_TIMEOUT_S = 300


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop)
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the one JSON line, logs go to stderr
    with tempfile.TemporaryDirectory(prefix="probeserve-tiny-") as tmp:
        root = Path(tmp)
        os.environ["PROBESERVE_CACHE"] = str(root / "cache")  # the merged checkpoint, thrown away after
        tiny = make_all(root / "tiny")
        server = start_server(
            bundle=tiny.bundle_dir,
            model=tiny.model_dir,
            precision="fp32",
            log_path=root / "server.log",
            extra_args=tuple(argv),
            timeout_s=STARTUP_TIMEOUT_S,
        )
        try:
            line = {"target": server.target, "log": str(server.log_path), "bundle": str(tiny.bundle_dir)}
            print(json.dumps(line), file=out, flush=True)
            sys.stdin.read()  # until the caller closes the pipe (or exits)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
