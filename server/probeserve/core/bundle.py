"""Probe bundles: the LoRA adapter, probe heads and function schemas that the training recipe writes.

A bundle is a directory::

    lora_adapter/             PEFT LoRA directory (adapter_config.json + weights)
    probe_heads.pt            {"null_head": {...}, "pointer_head": {...}}  (or probe_heads.safetensors)
    function_schemas.json     {function: {"name", "description", "slots": {slot: {...}}}}
    bundle.json               optional manifest: name, version, base model, utterance_segmentation, ...
    pairing.json              optional, from `probeserve bundle pack`: the source model's fingerprints
    calibration.json          optional, likewise: reference head scores for the pairing check

Loading never executes code from the bundle: ``.pt`` heads go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from probeserve.core import segmentation
from probeserve.core.errors import BundleError
from probeserve.core.heads import ProbeHeads

ADAPTER_DIR = "lora_adapter"
HEADS_PT = "probe_heads.pt"
HEADS_SAFETENSORS = "probe_heads.safetensors"
SCHEMAS_FILE = "function_schemas.json"
MANIFEST_FILE = "bundle.json"
PAIRING_FILE = "pairing.json"

# Flat names of the head tensors, as the recipe's module state dicts name them.
_HEAD_KEYS = {
    "null_head.classifier.weight": "null_weight",
    "null_head.classifier.bias": "null_bias",
    "pointer_head.W_start.weight": "start_weight",
    "pointer_head.W_end.weight": "end_weight",
}


@dataclass(frozen=True)
class SlotSchema:
    """One slot of a function schema."""

    name: str
    type: str = ""
    optional: bool = False
    description: str = ""


@dataclass(frozen=True)
class FunctionSchema:
    """A function and its slots; slots are kept sorted by name, the order of the prompt markers."""

    name: str
    description: str
    slots: tuple[SlotSchema, ...]

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)


@dataclass(frozen=True)
class Bundle:
    """A loaded probe bundle."""

    path: Path
    name: str
    version: str
    heads: ProbeHeads
    functions: Mapping[str, FunctionSchema]
    adapter_path: Path
    lora_rank: int
    manifest: Mapping[str, Any] = field(default_factory=dict)
    pairing: Mapping[str, Any] | None = None  # what `bundle pack` recorded of the source model
    # How the prompt tokenizes the utterance (probeserve.core.segmentation); the bundle's heads
    # only point right in the layout they were trained with.
    utterance_segmentation: str = segmentation.DEFAULT_LAYOUT
    # Content digests, so that a caller can tell two bundles of one name apart (GetInfo).
    adapter_sha256: str = ""
    heads_sha256: str = ""

    @property
    def hidden_size(self) -> int:
        return self.heads.hidden_size

    @property
    def base_model_fingerprint(self) -> str:
        """The source model's fingerprint as `bundle pack` (or the manifest) recorded it."""
        source = (self.pairing or {}).get("source") or self.manifest.get("base_model") or {}
        return str(source.get("fingerprint", "")) if isinstance(source, Mapping) else ""


def files_sha256(files: Iterable[Path]) -> str:
    """One SHA-256 over the files' names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def parse_schemas(raw: Mapping[str, Any]) -> dict[str, FunctionSchema]:
    """Turn a ``function_schemas.json`` mapping into schemas with slots sorted by name."""
    functions: dict[str, FunctionSchema] = {}
    for key in sorted(raw):
        entry = raw[key]
        slots_raw = entry.get("slots")
        if not isinstance(slots_raw, Mapping) or not slots_raw:
            raise BundleError(f"function {key!r} in {SCHEMAS_FILE} has no slots")
        slots = tuple(
            SlotSchema(
                name=slot,
                type=str(spec.get("type", "")),
                optional=bool(spec.get("optional", False)),
                description=str(spec.get("description", "")),
            )
            for slot, spec in sorted(slots_raw.items())
        )
        functions[key] = FunctionSchema(name=key, description=str(entry.get("description", "")), slots=slots)
    return functions


def _flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def heads_from_state_dict(state: Mapping[str, Any]) -> ProbeHeads:
    """Build heads from the recipe's nested state dict or its flat (safetensors) form."""
    flat = _flatten(state)
    missing = sorted(set(_HEAD_KEYS) - set(flat))
    if missing:
        raise BundleError(f"probe heads lack tensors: {', '.join(missing)}")
    tensors: dict[str, torch.Tensor] = {}
    for key, attr in _HEAD_KEYS.items():
        value = flat[key]
        if not isinstance(value, torch.Tensor):
            raise BundleError(f"probe head entry {key!r} is not a tensor")
        tensors[attr] = value.detach().to(torch.float32).contiguous()
    return ProbeHeads(**tensors)


def load_heads(bundle_dir: Path) -> ProbeHeads:
    """Load the heads from ``probe_heads.safetensors`` or, failing that, ``probe_heads.pt``."""
    st_path = bundle_dir / HEADS_SAFETENSORS
    pt_path = bundle_dir / HEADS_PT
    if st_path.is_file():
        return heads_from_state_dict(load_file(str(st_path)))
    if pt_path.is_file():
        try:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError and friends for unsafe files
            raise BundleError(f"cannot load {pt_path} as plain tensors: {exc}") from exc
        if not isinstance(state, Mapping):
            raise BundleError(f"{pt_path} does not hold a dict of tensors")
        return heads_from_state_dict(state)
    raise BundleError(f"bundle {bundle_dir} has neither {HEADS_SAFETENSORS} nor {HEADS_PT}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"missing {path}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None


def load_bundle(path: str | Path) -> Bundle:
    """Load and check a bundle directory; raises :class:`BundleError` with the reason."""
    bundle_dir = Path(path).resolve()
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    manifest_path = bundle_dir / MANIFEST_FILE
    manifest: dict[str, Any] = _read_json(manifest_path) if manifest_path.is_file() else {}
    adapter_path = bundle_dir / ADAPTER_DIR
    adapter_config = _read_json(adapter_path / "adapter_config.json")
    heads = load_heads(bundle_dir)
    heads_file = bundle_dir / (HEADS_SAFETENSORS if (bundle_dir / HEADS_SAFETENSORS).is_file() else HEADS_PT)
    functions = parse_schemas(_read_json(bundle_dir / SCHEMAS_FILE))
    pairing_path = bundle_dir / PAIRING_FILE
    pairing = _read_json(pairing_path) if pairing_path.is_file() else None
    try:
        layout = segmentation.check_layout(manifest.get(segmentation.FIELD, segmentation.DEFAULT_LAYOUT))
    except ValueError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    return Bundle(
        path=bundle_dir,
        name=str(manifest.get("name") or bundle_dir.name),
        version=str(manifest.get("version") or "0"),
        heads=heads,
        functions=functions,
        adapter_path=adapter_path,
        lora_rank=int(adapter_config.get("r", 0)),
        manifest=manifest,
        pairing=pairing,
        utterance_segmentation=layout,
        adapter_sha256=files_sha256(p for p in adapter_path.iterdir() if p.is_file()),
        heads_sha256=files_sha256([heads_file]),
    )
