"""Conversion between protobuf messages and the core's dataclasses (the protocol layer)."""

from __future__ import annotations

from probeserve.core.extraction import Extraction, ExtractionRequest
from probeserve.core.registry import LoadedBundle
from probeserve_client._proto.probeserve.v1 import probe_service_pb2 as pb

PRECISIONS = {
    "fp32": pb.PRECISION_FP32,
    "fp16": pb.PRECISION_FP16,
    "bf16": pb.PRECISION_BF16,
    "awq": pb.PRECISION_AWQ_INT4,
}


def to_core(request: pb.ExtractRequest) -> ExtractionRequest:
    return ExtractionRequest(
        function=request.function,
        utterance=request.utterance,
        request_id=request.request_id,
        bundle=request.bundle,
    )


def to_response(extraction: Extraction) -> pb.ExtractResponse:
    response = pb.ExtractResponse(request_id=extraction.request_id, prompt_tokens=extraction.prompt_tokens)
    for slot in extraction.slots:
        # Optional span fields stay unset for absent slots (None is skipped).
        fields = {k: v for k, v in vars(slot).items() if v is not None}
        response.slots.append(pb.SlotValue(**fields))
    return response


def bundle_info(entry: LoadedBundle, default_name: str) -> pb.BundleInfo:
    bundle = entry.bundle
    return pb.BundleInfo(
        name=entry.name,
        version=bundle.version,
        hidden_size=bundle.hidden_size,
        utterance_segmentation=bundle.utterance_segmentation,
        adapter_sha256=bundle.adapter_sha256,
        heads_sha256=bundle.heads_sha256,
        base_model_fingerprint=bundle.base_model_fingerprint,
        is_default=entry.name == default_name,
        functions=[
            pb.FunctionInfo(
                name=fn.name,
                description=fn.description,
                slots=[
                    pb.SlotInfo(name=s.name, type=s.type, optional=s.optional, description=s.description)
                    for s in fn.slots
                ],
            )
            for fn in bundle.functions.values()
        ],
    )
