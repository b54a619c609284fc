"""The ``probeserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from probeserve.core.checkpoint import folded_adapter
from probeserve.core.errors import BundleError, ProbeError
from probeserve.engines.config import (
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_EAGER,
    DEFAULT_ENGINE,
    ENGINE_KINDS,
    PRECISION_DTYPES,
    PRECISIONS,
    resolve_precision,
)
from probeserve.logs import configure_logging
from probeserve.pairing.checks import PairingError
from probeserve.transport.bundles import BundleSpec
from probeserve.transport.servicer import ServerLimits

# The demo: a bundle committed in the repository and the base model that `make serve` converts
# (scripts/demo_model.py). Found relative to this file, so they exist in a checkout only.
REPO = Path(__file__).resolve().parent.parent.parent
DEMO_BUNDLE = REPO / "bundles" / "xlam-smollm2-135m-v2"
DEMO_MODELS = Path(os.environ.get("PROBESERVE_CACHE", REPO / ".cache")) / "models"
DEMO_MODEL = DEMO_MODELS / "smollm2-135m-instruct"
DEMO_AWQ_MODEL = DEMO_MODELS / "smollm2-135m-instruct-awq"  # `make demo-awq` (scripts/quantize_awq.py)
# Exit status when the pairing check refuses the model (2 is argparse's usage error).
EXIT_PAIRING = 3


def _default(variable: str, demo: Path) -> Path:
    return Path(os.environ[variable]) if os.environ.get(variable) else demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _default_bundles() -> list[str]:
    listed = os.environ.get("PROBESERVE_BUNDLE", "")
    return [item for item in listed.split(",") if item] or [str(DEMO_BUNDLE)]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The bundles, the model and how the engine runs them: shared by serve and check-pairing."""
    parser.add_argument(
        "--bundle", dest="bundles", action="append", metavar="[NAME=]DIR",
        help="a probe bundle directory, served under NAME or the name in its bundle.json; repeat it "
        "to serve several bundles on one model, each with its adapter per request (default: "
        f"$PROBESERVE_BUNDLE, comma-separated, or the demo's, {DEMO_BUNDLE})",
    )  # fmt: skip
    parser.add_argument(
        "--model", type=Path, default=None,
        help="model checkpoint directory: full precision, or a 4-bit AWQ one for --precision awq "
        f"(default: $PROBESERVE_MODEL or the demo's, {DEMO_MODEL}, or {DEMO_AWQ_MODEL.name} at awq)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=["auto", *PRECISIONS], default="auto",
        help="auto: awq for a 4-bit checkpoint, else bf16 on GPUs and CPUs with native bf16, else fp32",
    )  # fmt: skip
    parser.add_argument(
        "--lora-mode", choices=["auto", "adapter", "merged", "premerged"], default="auto",
        help="merged: merge the adapter into the weights once (cached, verified) and run the engine "
        "without LoRA (one bundle only); adapter: each request carries its bundle's adapter; "
        "premerged: the checkpoint already holds the bundle's adapter (scripts/quantize_awq.py "
        "--merge-adapter; one bundle only); auto: premerged for such a checkpoint, else merged for "
        "one bundle at full precision without --admin, else adapter",
    )  # fmt: skip
    parser.add_argument(
        "--max-loras", type=_positive_int,
        help="adapters one engine step may mix (default: the number of bundles; at least "
        "4 with --admin)",
    )  # fmt: skip
    parser.add_argument(
        "--specialize-active-lora", action=argparse.BooleanOptionalAction,
        help="vLLM captures CUDA graphs for 1, 2, 4, ... active adapters instead of one graph sized "
        "for --max-loras, so a step runs LoRA kernels over the adapters it mixes, not over every "
        "slot (three times the graphs: a longer start-up). Default: on for a compiled engine on a "
        "GPU with slots for more than one adapter, else off",
    )  # fmt: skip
    parser.add_argument(
        "--max-lora-rank", type=_positive_int,
        help="the largest LoRA rank the engine takes (default: the bundles' largest; at least 16 "
        "with --admin)",
    )  # fmt: skip
    parser.add_argument(
        "--engine", choices=ENGINE_KINDS, default=DEFAULT_ENGINE,
        help="process: vLLM's engine core in its own process; inline: in this process, driven by a "
        "thread (no hidden states cross processes)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
        help="inline engine: an idle engine waits up to this long for as many requests as its last "
        "step answered, so a burst of concurrent calls shares one step (0: start at once)",
    )  # fmt: skip
    parser.add_argument(
        "--load-format", choices=["auto", "dummy"], default="auto",
        help="dummy: random weights of the checkpoint's shape, for benchmarks (needs --skip-pairing-check)",
    )  # fmt: skip
    parser.add_argument("--max-model-len", type=int, default=512, help="longest prompt in tokens")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="engine batch size")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.5, help="share of GPU memory the engine may take"
    )
    parser.add_argument(
        "--tensor-parallel-size", type=_positive_int, default=1,
        help="shard the model over this many devices (GPUs; on a CPU, worker processes)",
    )  # fmt: skip
    compiled, eager = ("", " (the default)") if DEFAULT_EAGER else (" (the default)", "")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument(
        "--compile", dest="eager", action="store_false", default=DEFAULT_EAGER,
        help="let vLLM compile the model (torch.compile; CUDA graphs on a GPU): a slower first start, "
        f"faster requests{compiled}",
    )  # fmt: skip
    speed.add_argument(
        "--eager", dest="eager", action="store_true",
        help=f"run the model eagerly: a fast start, slower requests{eager}",
    )  # fmt: skip


def _add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a probe bundle over gRPC")
    _add_model_args(serve)
    _add_log_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument(
        "--default-bundle", default="", metavar="NAME",
        help="the bundle that answers requests naming none (default: the first --bundle)",
    )  # fmt: skip
    serve.add_argument(
        "--admin", action="store_true",
        help="serve probeserve.v1.AdminService (load, unload and list bundles while serving); it "
        "needs auth unless the server listens on loopback only",
    )  # fmt: skip
    serve.add_argument(
        "--skip-pairing-check", action="store_true",
        help="serve even if the model cannot be shown to be the bundle's (logged loudly)",
    )  # fmt: skip
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
    obs.add_argument(
        "--log-utterances", action="store_true",
        help="put utterance text in the logs (default: only lengths and ids are logged)",
    )  # fmt: skip
    check = commands.add_parser(
        "check-pairing",
        help="check that a model is the one a bundle was trained for (the check serve runs before SERVING)",
    )
    _add_model_args(check)
    _add_log_args(check)
    check.add_argument(
        "--keep-going", action="store_true",
        help="run the engine checks even after a structure or provenance check failed (diagnosis)",
    )  # fmt: skip
    bundle = commands.add_parser("bundle", help="bundle tools")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    pack = bundle_commands.add_parser(
        "pack", help="add the source model's fingerprints and calibration references to a bundle"
    )
    pack.add_argument("bundle_dir", type=Path, metavar="BUNDLE")
    pack.add_argument(
        "--model", type=Path, required=True, help="the full-precision model the bundle was trained on"
    )
    pack.add_argument(
        "--calibration", type=Path, required=True,
        help="JSONL of {function, utterance}: the first --examples whose function the bundle has are used",
    )  # fmt: skip
    pack.add_argument("--examples", type=int, default=32)
    _add_log_args(pack)
    return parser


def _auth_tokens(path: Path | None) -> tuple[str, ...]:
    tokens = [os.environ.get("PROBESERVE_AUTH_TOKEN", "")]
    if path is not None:
        tokens += path.read_text().splitlines()
    return tuple(t.strip() for t in tokens if t.strip())


def _engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ServeConfig fields shared by serve and check-pairing, with the demo defaults resolved."""
    demo = DEMO_AWQ_MODEL if args.precision == "awq" else DEMO_MODEL
    model = args.model or _default("PROBESERVE_MODEL", demo)
    hints = {DEMO_MODEL: " (`make demo-model` makes it)", DEMO_AWQ_MODEL: " (`make demo-awq` makes it)"}
    bundles = [BundleSpec.parse(text) for text in args.bundles or _default_bundles()]
    for what, path in (*(("bundle", spec.path) for spec in bundles), ("model", model)):
        if not path.is_dir():
            sys.exit(f"error: {what} directory {path} does not exist{hints.get(path, '')}")
    try:
        precision = resolve_precision(args.precision, model)
    except ProbeError as exc:
        sys.exit(f"error: {exc}")
    lora_mode = args.lora_mode
    if lora_mode == "auto" and folded_adapter(model) is not None:
        lora_mode = "premerged"
    elif lora_mode == "auto":
        one_bundle = len(bundles) == 1 and not getattr(args, "admin", False)
        full = precision in PRECISION_DTYPES and args.load_format != "dummy"
        lora_mode = "merged" if one_bundle and full else "adapter"
    return {
        "bundles": tuple(bundles),
        "max_loras": args.max_loras,
        "specialize_active_lora": args.specialize_active_lora,
        "max_lora_rank": args.max_lora_rank,
        "model": model,
        "precision": precision,
        "lora_mode": lora_mode,
        "inline": args.engine == "inline",
        "batch_wait_ms": args.batch_wait_ms,
        "load_format": args.load_format,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.eager,
        "tensor_parallel_size": args.tensor_parallel_size,
    }


def _serve(args: argparse.Namespace) -> None:
    from probeserve.transport.server import ServeConfig, TlsConfig, serve

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            sys.exit("error: --tls-cert and --tls-key go together")
        tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    elif args.tls_client_ca:
        sys.exit("error: --tls-client-ca needs --tls-cert and --tls-key")
    if args.load_format == "dummy" and not args.skip_pairing_check:
        sys.exit("error: --load-format dummy serves random weights; it needs --skip-pairing-check")
    config = ServeConfig(
        **_engine_settings(args),
        host=args.host,
        port=args.port,
        skip_pairing_check=args.skip_pairing_check,
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
        default_bundle=args.default_bundle,
        admin=args.admin,
    )
    try:
        asyncio.run(serve(config))
    except (ProbeError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_PAIRING if isinstance(exc, PairingError) else 1)


def _check_pairing(args: argparse.Namespace) -> None:
    from probeserve.transport.server import ServeConfig, check_pairing

    try:
        config = ServeConfig(**_engine_settings(args))
        results = asyncio.run(check_pairing(config, keep_going=args.keep_going))
    except (ProbeError, BundleError) as exc:
        sys.exit(f"error: {exc}")
    refused = False
    for name, checks in results.items():
        prefix = f"{name}: " if len(results) > 1 else ""
        for check in checks:
            print(prefix + check.line())
        failed = [c for c in checks if not c.passed]
        refused = refused or bool(failed)
        verdict = "FAILED (" + failed[0].name + ")" if failed else "passed"
        print(f"{prefix}pairing: {verdict} ({len(checks)} checks)")
    sys.exit(EXIT_PAIRING if refused else 0)


def _bundle_pack(args: argparse.Namespace) -> None:
    from probeserve.pairing.pack import pack

    try:
        section = pack(args.bundle_dir, args.model, args.calibration, args.examples)
    except (ProbeError, BundleError) as exc:
        sys.exit(f"error: {exc}")
    examples = section["calibration"]["examples"]
    print(f"packed {args.bundle_dir}: {examples} calibration examples from {args.model}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json_logs)
    if args.command == "serve":
        _serve(args)
    elif args.command == "check-pairing":
        _check_pairing(args)
    elif args.command == "bundle" and args.bundle_command == "pack":
        _bundle_pack(args)
    sys.exit(0)


if __name__ == "__main__":
    main()
