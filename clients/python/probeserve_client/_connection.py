"""How the command line connects: target, deadline, TLS and a bearer token.

Every command takes these options before or after its name (``probeserve-client --target X info``
and ``probeserve-client info --target X`` are the same): the top-level parser holds the defaults,
each command's parser the same options with no default, so only what is given there overrides.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "localhost:50051"
TOKEN_ENV = "PROBESERVE_AUTH_TOKEN"


def add_connection_arguments(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add the options; ``defaults=False`` for a command's parser (see the module's docstring)."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=default(DEFAULT_TARGET), help="host:port or any gRPC target")
    group.add_argument("--timeout", type=float, default=default(30.0), help="deadline of each call, seconds")
    group.add_argument(
        "--auth-token", default=default(os.environ.get(TOKEN_ENV)),
        help=f"bearer token sent as 'authorization: Bearer ...' (default: ${TOKEN_ENV})",
    )  # fmt: skip
    group.add_argument(
        "--tls", action="store_true", default=default(False), help="connect with TLS (system CA roots)"
    )
    group.add_argument(
        "--tls-ca", type=Path, default=default(None), help="CA certificate (PEM); implies --tls"
    )
    group.add_argument(
        "--tls-cert", type=Path, default=default(None), help="client certificate (PEM), for mTLS"
    )
    group.add_argument(
        "--tls-key", type=Path, default=default(None), help="client key (PEM), with --tls-cert"
    )
    group.add_argument(
        "--tls-server-name",
        default=default(None),
        help="name the server's certificate is for, if not the target's",
    )


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``ProbeClient``/``AsyncProbeClient`` keyword arguments for the parsed options."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    kwargs: dict[str, Any] = {"timeout": args.timeout}
    if args.auth_token:
        kwargs["metadata"] = (("authorization", f"Bearer {args.auth_token}"),)
    if args.tls or args.tls_ca or args.tls_cert:
        kwargs["credentials"] = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        if args.tls_server_name:
            kwargs["options"] = [("grpc.ssl_target_name_override", args.tls_server_name)]
    elif args.tls_server_name:
        raise ValueError("--tls-server-name needs TLS (--tls or --tls-ca)")
    return kwargs
