"""Request builders and result converters shared by the sync and async clients."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from probeserve_client._errors import status_code
from probeserve_client._proto.probeserve.v1 import admin_service_pb2 as admin_pb
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb
from probeserve_client._types import (
    BundleInfo,
    BundleList,
    Extraction,
    ExtractItem,
    ExtractResult,
    FunctionInfo,
    ItemError,
    LoadedBundle,
    ServerInfo,
    Slot,
    SlotInfo,
    UnloadedBundle,
)

SERVICE = "probeserve.v1.ProbeService"


def channel_options(
    *,
    retries: int = 3,
    load_balancing: str | None = None,
    keepalive_s: float | None = 30.0,
    keepalive_timeout_s: float | None = None,
    reconnect_backoff_s: float | None = None,
    max_reconnect_backoff_s: float | None = None,
    extra: Sequence[tuple[str, object]] = (),
) -> list[tuple[str, object]]:
    """Channel options: gRPC's own retry policy and load balancing, keepalive, reconnect back-off.

    ``retries`` > 0 adds a ``methodConfig`` retrying UNAVAILABLE; ``load_balancing`` (a gRPC LB
    policy name such as ``"round_robin"`` or ``"pick_first"``) adds ``loadBalancingConfig``; both
    go into one service config. Times are seconds; ``None`` leaves gRPC's default. ``extra``
    options come last, so they override these.
    """
    options: list[tuple[str, object]] = []
    config: dict[str, object] = {}
    if retries > 0:
        config["methodConfig"] = [
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
        options.append(("grpc.enable_retries", 1))
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if config:
        options.append(("grpc.service_config", json.dumps(config)))
    if keepalive_s:
        options += [
            ("grpc.keepalive_time_ms", _ms(keepalive_s)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    if keepalive_timeout_s is not None:
        options.append(("grpc.keepalive_timeout_ms", _ms(keepalive_timeout_s)))
    if reconnect_backoff_s is not None:
        options.append(("grpc.initial_reconnect_backoff_ms", _ms(reconnect_backoff_s)))
    if max_reconnect_backoff_s is not None:
        options.append(("grpc.max_reconnect_backoff_ms", _ms(max_reconnect_backoff_s)))
    return options + list(extra)


def _ms(seconds: float) -> int:
    if seconds < 0:
        raise ValueError(f"a duration must not be negative, got {seconds}")
    return int(seconds * 1000)


def to_request(item: ExtractItem) -> pb.ExtractRequest:
    return pb.ExtractRequest(
        request_id=item.request_id, function=item.function, utterance=item.utterance, bundle=item.bundle
    )


def to_item(item: ExtractItem | tuple[str, str], bundle: str = "") -> ExtractItem:
    """An item as sent: a ``(function, utterance)`` pair made whole, ``bundle`` where it names none."""
    if not isinstance(item, ExtractItem):
        item = ExtractItem(*item)
    if bundle and not item.bundle:
        item = ExtractItem(item.function, item.utterance, item.request_id, bundle)
    return item


def to_items(items: Iterable[ExtractItem | tuple[str, str]], bundle: str = "") -> list[ExtractItem]:
    return [to_item(i, bundle) for i in items]


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


def from_bundle(b: pb.BundleInfo) -> BundleInfo:
    return BundleInfo(
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
        utterance_segmentation=b.utterance_segmentation,
        adapter_sha256=b.adapter_sha256,
        heads_sha256=b.heads_sha256,
        base_model_fingerprint=b.base_model_fingerprint,
        is_default=b.is_default,
    )


def from_bundle_list(reply: admin_pb.ListBundlesResponse) -> BundleList:
    return BundleList(tuple(from_bundle(b) for b in reply.bundles), tuple(reply.engine_adapters))


def from_loaded(reply: admin_pb.LoadBundleResponse) -> LoadedBundle:
    replaced = reply.replaced_version if reply.HasField("replaced_version") else None
    return LoadedBundle(from_bundle(reply.bundle), replaced, reply.load_seconds)


def from_unloaded(reply: admin_pb.UnloadBundleResponse) -> UnloadedBundle:
    return UnloadedBundle(from_bundle(reply.bundle), reply.drained_requests)


def from_info(info: pb.GetInfoResponse) -> ServerInfo:
    bundles = tuple(from_bundle(b) for b in info.bundles)
    precision = pb.Precision.Name(info.precision).removeprefix("PRECISION_").lower()
    return ServerInfo(
        model=info.model,
        precision=precision,
        bundles=bundles,
        max_prompt_tokens=info.max_prompt_tokens,
        server_version=info.server_version,
        engine_version=info.engine_version,
    )
