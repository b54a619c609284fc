"""``probeserve-client``: call a probeserve server from the shell; prints JSON.

probeserve-client --target localhost:50051 extract book_flight "Fly me to Rome on May 2nd"
probeserve-client stream < items.jsonl      # lines of {"function": ..., "utterance": ...}
probeserve-client info | health
probeserve-client bundles | load-bundle DIR [--name N] [--replace] | unload-bundle NAME   # --admin
probeserve-client loadtest --target HOST:PORT --rate 20 --duration 10 --out r.json --plot r.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from probeserve_client._client import ProbeClient
from probeserve_client._connection import add_connection_arguments, client_kwargs
from probeserve_client._errors import ProbeServeError
from probeserve_client._inputs import parse_items
from probeserve_client.loadtest import _cli as loadtest_cli


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    if hasattr(obj, "name") and hasattr(obj, "value") and obj.__class__.__module__.startswith("grpc"):
        return obj.name
    return obj


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probeserve-client", description=(__doc__ or "").splitlines()[0])
    add_connection_arguments(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, what: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=what, description=what)
        add_connection_arguments(sub, defaults=False)
        return sub

    extract = command("extract", "extract the slots of one utterance")
    extract.add_argument("function")
    extract.add_argument("utterance")
    bundle_help = "bundle to ask for (default: the server's default)"
    extract.add_argument("--bundle", default="", help=bundle_help)
    for name, what in (
        ("batch", "extract JSONL items from stdin in one call"),
        ("stream", "stream JSONL items from stdin, print results as they come"),
    ):
        command(name, what).add_argument("--bundle", default="", help=bundle_help + " for items naming none")
    command("info", "describe the server")
    command("health", "print the health status")
    command("bundles", "list the loaded bundles and the engine's adapters (AdminService)")
    load = command("load-bundle", "load a bundle directory on the server (AdminService)")
    load.add_argument("path", help="the bundle directory, as a path on the server")
    load.add_argument("--name", default="", help="serve it under this name (default: its own)")
    load.add_argument("--replace", action="store_true", help="replace a loaded bundle of that name")
    load.add_argument("--make-default", action="store_true", help="make it the default bundle")
    unload = command(
        "unload-bundle", "unload a bundle once its admitted requests are answered (AdminService)"
    )
    unload.add_argument("name")
    loadtest = command("loadtest", "put closed- or open-loop load on a server; print a report")
    loadtest_cli.add_arguments(loadtest)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "loadtest":
            sys.exit(loadtest_cli.main(args))
        with ProbeClient(args.target, **client_kwargs(args)) as client:
            if args.command == "extract":
                result = client.extract(args.function, args.utterance, bundle=args.bundle)
                print(json.dumps(_jsonable(result), indent=2))
            elif args.command == "batch":
                for item in client.extract_batch(parse_items(sys.stdin, "stdin"), bundle=args.bundle):
                    print(json.dumps(_jsonable(item)))
            elif args.command == "stream":
                for item in client.stream(parse_items(sys.stdin, "stdin"), bundle=args.bundle):
                    print(json.dumps(_jsonable(item)), flush=True)
            elif args.command == "info":
                print(json.dumps(_jsonable(client.info()), indent=2))
            elif args.command == "bundles":
                print(json.dumps(_jsonable(client.bundles()), indent=2))
            elif args.command == "load-bundle":
                loaded = client.load_bundle(
                    args.path, name=args.name, replace=args.replace, make_default=args.make_default
                )
                print(json.dumps(_jsonable(loaded), indent=2))
            elif args.command == "unload-bundle":
                print(json.dumps(_jsonable(client.unload_bundle(args.name)), indent=2))
            else:
                print(client.health())
    except ProbeServeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
