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

__version__ = "0.1.0"

__all__ = [
    "AsyncProbeClient",
    "AsyncResultStream",
    "BundleInfo",
    "BundleList",
    "ExtractItem",
    "ExtractResult",
    "Extraction",
    "FunctionInfo",
    "ItemError",
    "LoadedBundle",
    "ProbeClient",
    "ProbeServeError",
    "ResultStream",
    "ServerInfo",
    "Slot",
    "SlotInfo",
    "UnloadedBundle",
    "parse_items",
    "read_items",
]
