"""The ``probeserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from probeserve.engine import PRECISION_DTYPES
from probeserve.logs import configure_logging
from probeserve.servicer import ServerLimits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a probe bundle over gRPC")
    serve.add_argument("--bundle", type=Path, required=True, help="probe bundle directory")
    serve.add_argument("--model", type=Path, required=True, help="base model checkpoint directory")
    serve.add_argument(
        "--precision",
        choices=sorted(PRECISION_DTYPES),
        default="bf16",
        help="numeric format of the engine (bf16 is fastest on CPUs with AVX512-BF16)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--max-model-len", type=int, default=512, help="longest prompt in tokens")
    serve.add_argument("--max-num-seqs", type=int, default=16, help="engine batch size")
    serve.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM compile the model (slower start, faster steady state)",
    )
    serve.add_argument("--max-batch-items", type=int, default=256)
    serve.add_argument(
        "--stream-window", type=int, default=32, help="stream items in flight before the server stops reading"
    )
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to drain on shutdown")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json_logs)
    if args.command == "serve":
        from probeserve.server import ServeConfig, serve

        config = ServeConfig(
            bundle=args.bundle,
            model=args.model,
            precision=args.precision,
            host=args.host,
            port=args.port,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            enforce_eager=not args.compile,
            grace_s=args.grace,
            limits=ServerLimits(max_batch_items=args.max_batch_items, stream_window=args.stream_window),
        )
        asyncio.run(serve(config))
        sys.exit(0)


if __name__ == "__main__":
    main()
