"""The client's load tester (``probeserve-client loadtest``) plus what only this repository has.

    python scripts/bench/loadtest.py --target 127.0.0.1:50051 --concurrency 8 --duration 30
    python scripts/bench/loadtest.py --target HOST:PORT --rate 5 --max-outstanding 32 --mode stream
    python scripts/bench/loadtest.py --spawn --precision fp32 --concurrency 4 -- --max-num-seqs 8

The load, the report, ``--out`` and ``--plot`` are all ``probeserve-client loadtest``'s (its
``--help`` lists the options; it is the same code, in ``probeserve_client.loadtest``). This
adds two things for benchmarks: the demo bundle's validation split as the default inputs
(utterances it was not trained on, in file order; ``--data`` is its directory), and ``--spawn``,
which starts ``probeserve serve`` for the run (``--server-bundle``, ``--model``, ``--precision``;
arguments after ``--`` go to the server; it accepts ``$PROBESERVE_AUTH_TOKEN`` when set) and
stops it after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from common import validation_utterances

from probeserve_client.cli import main as client_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Every other option goes to `probeserve-client loadtest` (see its --help).",
    )
    parser.add_argument("--spawn", action="store_true", help="start a server for the run, stop it after")
    parser.add_argument("--server-bundle", type=Path, help="with --spawn: bundle directory (default: demo's)")
    parser.add_argument("--model", type=Path, help="with --spawn: model directory (default: demo's)")
    parser.add_argument("--precision", default="auto", help="with --spawn (default: auto)")
    parser.add_argument("--data", type=Path, help="data directory of the validation split (default inputs)")
    return parser


def _run(loadtest_args: list[str]) -> int:
    try:
        client_main(["loadtest", *loadtest_args])
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.spawn == any(a == "--target" or a.startswith("--target=") for a in rest):
        parser.error("give exactly one of --target and --spawn")
    if server_args and not args.spawn:
        parser.error("arguments after -- need --spawn")

    with tempfile.TemporaryDirectory() as tmp:
        if not any(a == "--inputs" or a.startswith("--inputs=") for a in rest):
            inputs = Path(tmp) / "validation.jsonl"
            split = validation_utterances(args.data)
            inputs.write_text("".join(json.dumps(dataclasses.asdict(u)) + "\n" for u in split))
            rest += ["--inputs", str(inputs)]
        if not args.spawn:
            return _run(rest)

        from probeserve.cli import DEMO_BUNDLE, DEMO_MODEL
        from probeserve.launcher import start_server

        server = start_server(
            bundle=args.server_bundle or DEMO_BUNDLE,
            model=args.model or DEMO_MODEL,
            precision=args.precision,
            log_path=Path(tmp) / "server.log",
            extra_args=tuple(server_args),
        )
        print(f"spawned server on {server.target} in {server.startup_s:.1f} s", file=sys.stderr)
        try:
            return _run([*rest, "--target", server.target])
        finally:
            print(f"server exited with {server.stop()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
