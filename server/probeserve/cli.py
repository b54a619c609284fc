"""The ``probeserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from probeserve.engine import PRECISION_DTYPES, resolve_precision
from probeserve.logs import configure_logging
from probeserve.servicer import ServerLimits

# The demo: a bundle committed in the repository and the base model that `make serve` converts
# (scripts/demo_model.py). Found relative to this file, so they exist in a checkout only.
REPO = Path(__file__).resolve().parent.parent.parent
DEMO_BUNDLE = REPO / "bundles" / "xlam-smollm2-135m"
DEMO_MODEL = Path(os.environ.get("PROBESERVE_CACHE", REPO / ".cache")) / "models" / "smollm2-135m-instruct"


def _default(variable: str, demo: Path) -> Path:
    return Path(os.environ[variable]) if os.environ.get(variable) else demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a probe bundle over gRPC")
    serve.add_argument(
        "--bundle", type=Path, default=_default("PROBESERVE_BUNDLE", DEMO_BUNDLE),
        help=f"probe bundle directory (default: $PROBESERVE_BUNDLE or the demo, {DEMO_BUNDLE})",
    )  # fmt: skip
    serve.add_argument(
        "--model", type=Path, default=_default("PROBESERVE_MODEL", DEMO_MODEL),
        help=f"base model checkpoint directory (default: $PROBESERVE_MODEL or the demo's, {DEMO_MODEL})",
    )  # fmt: skip
    serve.add_argument(
        "--precision", choices=["auto", *sorted(PRECISION_DTYPES)], default="auto",
        help="numeric format of the engine; auto: bf16 on GPUs and CPUs with native bf16, else fp32",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--max-model-len", type=int, default=512, help="longest prompt in tokens")
    serve.add_argument("--max-num-seqs", type=int, default=16, help="engine batch size")
    serve.add_argument(
        "--gpu-memory-utilization", type=float, default=0.5, help="share of GPU memory the engine may take"
    )
    serve.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM compile the model (slower start, faster steady state)",
    )
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-in-flight", type=int, default=64,
        help="items admitted at once; beyond it unary calls get RESOURCE_EXHAUSTED and streams wait",
    )  # fmt: skip
    limits.add_argument("--max-batch-items", type=int, default=256)
    limits.add_argument(
        "--stream-window",
        type=int,
        default=32,
        help="a stream's items in flight before the server stops reading it",
    )
    limits.add_argument("--max-utterance-chars", type=int, default=8192)
    limits.add_argument("--max-message-bytes", type=int, default=1 << 20)
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to drain on shutdown")
    serve.add_argument(
        "--max-connection-age", type=float,
        help="seconds after which each client connection is closed (gracefully), so clients that "
        "balance over DNS re-resolve and find new replicas; default: never",
    )  # fmt: skip
    security = serve.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    security.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    security.add_argument("--tls-client-ca", type=Path, help="CA for client certificates (enables mTLS)")
    security.add_argument(
        "--auth-token-file", type=Path,
        help="file of accepted bearer tokens, one a line (also: PROBESERVE_AUTH_TOKEN); health stays open",
    )  # fmt: skip
    obs = serve.add_argument_group("observability")
    obs.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port (0: any)")
    obs.add_argument("--metrics-host", default="127.0.0.1")
    obs.add_argument("--log-level", default="info")
    obs.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    obs.add_argument(
        "--log-utterances", action="store_true",
        help="put utterance text in the logs (default: only lengths and ids are logged)",
    )  # fmt: skip
    return parser


def _auth_tokens(path: Path | None) -> tuple[str, ...]:
    tokens = [os.environ.get("PROBESERVE_AUTH_TOKEN", "")]
    if path is not None:
        tokens += path.read_text().splitlines()
    return tuple(t.strip() for t in tokens if t.strip())


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json_logs)
    if args.command == "serve":
        from probeserve.server import ServeConfig, TlsConfig, serve

        for what, path in (("bundle", args.bundle), ("model", args.model)):
            if not path.is_dir():
                hint = " (run `make serve` to make the demo model)" if path == DEMO_MODEL else ""
                sys.exit(f"error: {what} directory {path} does not exist{hint}")
        tls = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                sys.exit("error: --tls-cert and --tls-key go together")
            tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
        elif args.tls_client_ca:
            sys.exit("error: --tls-client-ca needs --tls-cert and --tls-key")

        config = ServeConfig(
            bundle=args.bundle,
            model=args.model,
            precision=resolve_precision(args.precision),
            host=args.host,
            port=args.port,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=not args.compile,
            grace_s=args.grace,
            limits=ServerLimits(
                max_in_flight=args.max_in_flight,
                max_batch_items=args.max_batch_items,
                stream_window=args.stream_window,
                max_utterance_chars=args.max_utterance_chars,
                max_message_bytes=args.max_message_bytes,
            ),
            tls=tls,
            auth_tokens=_auth_tokens(args.auth_token_file),
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            log_utterances=args.log_utterances,
            max_connection_age_s=args.max_connection_age,
        )
        asyncio.run(serve(config))
        sys.exit(0)


if __name__ == "__main__":
    main()
