"""``probeserve-client``: call a probeserve server from the shell; prints JSON.

probeserve-client --target localhost:50051 extract book_flight "Fly me to Rome on May 2nd"
probeserve-client stream < items.jsonl      # lines of {"function": ..., "utterance": ...}
probeserve-client info | health
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from probeserve_client._client import ProbeClient
from probeserve_client._errors import ProbeServeError
from probeserve_client._types import ExtractItem


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    if hasattr(obj, "name") and hasattr(obj, "value") and obj.__class__.__module__.startswith("grpc"):
        return obj.name
    return obj


def _items(stream: Any) -> list[ExtractItem]:
    items = []
    for line in stream:
        if line.strip():
            row = json.loads(line)
            items.append(ExtractItem(row["function"], row["utterance"], str(row.get("request_id", ""))))
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="probeserve-client", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--timeout", type=float, default=30.0)
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser("extract", help="extract the slots of one utterance")
    extract.add_argument("function")
    extract.add_argument("utterance")
    commands.add_parser("batch", help="extract JSONL items from stdin in one call")
    commands.add_parser("stream", help="stream JSONL items from stdin, print results as they come")
    commands.add_parser("info", help="describe the server")
    commands.add_parser("health", help="print the health status")
    args = parser.parse_args(argv)
    try:
        with ProbeClient(args.target, timeout=args.timeout) as client:
            if args.command == "extract":
                print(json.dumps(_jsonable(client.extract(args.function, args.utterance)), indent=2))
            elif args.command == "batch":
                for result in client.extract_batch(_items(sys.stdin)):
                    print(json.dumps(_jsonable(result)))
            elif args.command == "stream":
                for result in client.stream(_items(sys.stdin)):
                    print(json.dumps(_jsonable(result)), flush=True)
            elif args.command == "info":
                print(json.dumps(_jsonable(client.info()), indent=2))
            else:
                print(client.health())
    except ProbeServeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
