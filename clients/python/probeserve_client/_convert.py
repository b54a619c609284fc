"""Request builders and result converters shared by the sync and async clients."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from probeserve_client._errors import status_code
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._types import (
    BundleInfo,
    Extraction,
    ExtractItem,
    ExtractResult,
    FunctionInfo,
    ItemError,
    ServerInfo,
    Slot,
    SlotInfo,
)

SERVICE = "probeserve.v1.ProbeService"


def channel_options(
    *, retries: int = 3, keepalive_s: float | None = 30.0, extra: Sequence[tuple[str, object]] = ()
) -> list[tuple[str, object]]:
    """Channel options: gRPC's own retry policy on UNAVAILABLE, and keepalive pings."""
    options: list[tuple[str, object]] = []
    if retries > 0:
        config = {
            "methodConfig": [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": retries + 1,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    if keepalive_s:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    return options + list(extra)


def to_request(item: ExtractItem) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        request_id=item.request_id, function=item.function, utterance=item.utterance, bundle=item.bundle
    )


def to_items(items: Iterable[ExtractItem | tuple[str, str]]) -> list[ExtractItem]:
    return [i if isinstance(i, ExtractItem) else ExtractItem(*i) for i in items]


def from_response(response: pb.ExtractResponse) -> Extraction:
    slots = tuple(
        Slot(
            name=s.name,
            present=s.present,
            presence_probability=s.presence_probability,
            value=s.value if s.HasField("value") else None,
            char_start=s.char_start if s.HasField("char_start") else None,
            char_end=s.char_end if s.HasField("char_end") else None,
            token_start=s.token_start if s.HasField("token_start") else None,
            token_end=s.token_end if s.HasField("token_end") else None,
            start_probability=s.start_probability if s.HasField("start_probability") else None,
            end_probability=s.end_probability if s.HasField("end_probability") else None,
        )
        for s in response.slots
    )
    return Extraction(request_id=response.request_id, slots=slots, prompt_tokens=response.prompt_tokens)


def from_result(result: pb.ExtractResult) -> ExtractResult:
    if result.HasField("error"):
        error = ItemError(code=status_code(result.error.code), message=result.error.message)
        return ExtractResult(request_id=result.request_id, error=error)
    return ExtractResult(request_id=result.request_id, extraction=from_response(result.response))


def from_info(info: pb.GetInfoResponse) -> ServerInfo:
    bundles = tuple(
        BundleInfo(
            name=b.name,
            version=b.version,
            hidden_size=b.hidden_size,
            functions=tuple(
                FunctionInfo(
                    name=f.name,
                    description=f.description,
                    slots=tuple(SlotInfo(s.name, s.type, s.optional, s.description) for s in f.slots),
                )
                for f in b.functions
            ),
        )
        for b in info.bundles
    )
    precision = pb.Precision.Name(info.precision).removeprefix("PRECISION_").lower()
    return ServerInfo(
        model=info.model,
        precision=precision,
        bundles=bundles,
        max_prompt_tokens=info.max_prompt_tokens,
        server_version=info.server_version,
        engine_version=info.engine_version,
    )
