"""Typed Python client for probeserve: slot extraction over gRPC.

from probeserve_client import ProbeClient

with ProbeClient("localhost:50051") as client:
    result = client.extract("book_flight", "Fly me from Oslo to Rome on May 2nd")
    print(result.values())
"""

from probeserve_client._client import AsyncProbeClient, AsyncResultStream, ProbeClient, ResultStream
from probeserve_client._errors import ProbeServeError
from probeserve_client._inputs import parse_items, read_items
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

__version__ = "0.1.0"

__all__ = [
    "AsyncProbeClient",
    "AsyncResultStream",
    "BundleInfo",
    "ExtractItem",
    "ExtractResult",
    "Extraction",
    "FunctionInfo",
    "ItemError",
    "ProbeClient",
    "ProbeServeError",
    "ResultStream",
    "ServerInfo",
    "Slot",
    "SlotInfo",
    "parse_items",
    "read_items",
]
