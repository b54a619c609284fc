"""What a model checkpoint directory says about itself: its config and its quantization.

Read from ``config.json`` alone, without loading weights or vLLM, so the server can choose a
precision and refuse a wrong checkpoint before the engine starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from probeserve.core.errors import ProbeError

CONFIG_FILE = "config.json"
# Written by scripts/quantize_awq.py beside a checkpoint it made: what it was quantized from.
QUANTIZATION_RECORD = "probeserve_quantization.json"
# The adapter files whose digests identify a LoRA adapter (what peft writes and loads).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def sha256_file(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks (weight files are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_files(adapter: Path) -> dict[str, str]:
    """A LoRA adapter's identity: the sha256 of each of its :data:`ADAPTER_FILES` present."""
    return {name: sha256_file(adapter / name) for name in ADAPTER_FILES if (adapter / name).is_file()}


def quantization_record(model: Path) -> dict[str, Any] | None:
    """The quantizer's record beside the checkpoint (:data:`QUANTIZATION_RECORD`), ``None`` if none."""
    path = model / QUANTIZATION_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ProbeError(f"{path} does not hold a JSON object")
    return record


def folded_adapter(model: Path) -> dict[str, Any] | None:
    """The LoRA adapter the quantizer folded into this checkpoint's weights (its record's
    ``adapter``: path and file digests), or ``None`` when the checkpoint holds the base model only.

    A checkpoint with a folded adapter already computes base + adapter: the engine must not apply
    the adapter again, and the pairing check compares the digests with the bundle's adapter.
    """
    record = quantization_record(model)
    adapter = record.get("adapter") if record else None
    return adapter if isinstance(adapter, dict) else None


def read_config(model: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``."""
    path = model / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProbeError(f"{model} is not a model checkpoint: it has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ProbeError(f"{path} does not hold a JSON object")
    return config


def _is_w4a16(quant: Mapping[str, Any]) -> bool:
    """A compressed-tensors config whose groups all have 4-bit weights and no activation quantization."""
    groups = quant.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        return False
    for group in groups.values():
        weights = group.get("weights") or {}
        if weights.get("num_bits") != 4 or group.get("input_activations"):
            return False
    return True


def quantization(model: Path) -> str | None:
    """``"awq"`` for 4-bit-weight checkpoints vLLM runs with 16-bit activations, ``None`` if unquantized.

    AutoAWQ checkpoints (``quant_method: awq``) and compressed-tensors W4A16 ones (what
    llm-compressor's AWQModifier writes) both count; any other quantization is refused by name.
    """
    quant = read_config(model).get("quantization_config")
    if not quant:
        return None
    method = str(quant.get("quant_method", ""))
    if method == "awq" or (method == "compressed-tensors" and _is_w4a16(quant)):
        return "awq"
    raise ProbeError(
        f"{model} is quantized with {method or 'an unknown method'!r} in a scheme probeserve does not "
        "serve; use a full-precision checkpoint or a 4-bit AWQ (W4A16) one"
    )
