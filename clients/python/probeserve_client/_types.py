"""Plain typed results: what the SDK returns instead of protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class ExtractItem:
    """One utterance to extract from. ``request_id`` is echoed back; empty lets the server pick."""

    function: str
    utterance: str
    request_id: str = ""
    bundle: str = ""


@dataclass(frozen=True)
class Slot:
    """One slot's answer. Span fields are ``None`` when the slot is not present."""

    name: str
    present: bool
    presence_probability: float
    value: str | None = None
    char_start: int | None = None
    char_end: int | None = None
    token_start: int | None = None
    token_end: int | None = None
    start_probability: float | None = None
    end_probability: float | None = None


@dataclass(frozen=True)
class Extraction:
    """The answer to one utterance: one :class:`Slot` per schema slot, sorted by name."""

    request_id: str
    slots: tuple[Slot, ...]
    prompt_tokens: int

    def values(self) -> dict[str, str]:
        """The present slots' values by slot name."""
        return {s.name: s.value for s in self.slots if s.present and s.value is not None}

    def __getitem__(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise KeyError(name)


@dataclass(frozen=True)
class ItemError:
    """Why one item of a batch or stream got no answer."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class ExtractResult:
    """The outcome of one batch or stream item: an extraction or an error."""

    request_id: str
    extraction: Extraction | None = None
    error: ItemError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class SlotInfo:
    name: str
    type: str
    optional: bool
    description: str


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    description: str
    slots: tuple[SlotInfo, ...]


@dataclass(frozen=True)
class BundleInfo:
    """A loaded bundle: its name (what ``bundle=`` asks for), functions, layout and digests."""

    name: str
    version: str
    hidden_size: int
    functions: tuple[FunctionInfo, ...]
    utterance_segmentation: str = ""
    adapter_sha256: str = ""
    heads_sha256: str = ""
    base_model_fingerprint: str = ""
    is_default: bool = False


@dataclass(frozen=True)
class BundleList:
    """What ListBundles reports: the loaded bundles and the adapters the engine itself holds."""

    bundles: tuple[BundleInfo, ...]
    engine_adapters: tuple[str, ...]


@dataclass(frozen=True)
class LoadedBundle:
    """What LoadBundle reports: the bundle now served, and the version it replaced, if any."""

    bundle: BundleInfo
    replaced_version: str | None
    load_seconds: float


@dataclass(frozen=True)
class UnloadedBundle:
    """What UnloadBundle reports: the bundle no longer served and the requests it let finish."""

    bundle: BundleInfo
    drained_requests: int


@dataclass(frozen=True)
class ServerInfo:
    """What GetInfo reports: the model, precision, bundles and versions."""

    model: str
    precision: str
    bundles: tuple[BundleInfo, ...]
    max_prompt_tokens: int
    server_version: str
    engine_version: str
