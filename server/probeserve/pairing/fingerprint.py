"""Fingerprints of a model checkpoint: its structure, its tokenizer and sampled weights.

A bundle records these for the model it was trained on (``probeserve bundle pack``); the
pairing check compares a serving checkpoint against them. Weights are sampled a row at a time
through ``safetensors`` slices, so fingerprinting an 8B checkpoint reads kilobytes, not gigabytes.

AWQ quantizes the linear layers and folds its scales into the decoder layers' norms, but leaves
``embed_tokens`` and the final norm as they were: those two identify the source of an AWQ
checkpoint. A full-precision checkpoint is compared on a few elements of every tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from probeserve.core.checkpoint import read_config
from probeserve.core.errors import ProbeError

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
EMBED_ROWS = 16
EMBED_COLS = 32
NORM_COLS = 64
PER_TENSOR = 8
TOKENIZER_PROBE = "Function: book_flight\nFly 2 adults from Zürich to 東京 on 3/4!\n\ndate:\norigin:\n"
STRUCTURE_KEYS = ("architecture", "hidden_size", "vocab_size", "num_hidden_layers", "tokenizer_sha256")


def structure(model: Path) -> dict[str, Any]:
    """Architecture, sizes and tokenizer fingerprint: what must be equal for the heads to fit at all."""
    config = read_config(model)
    architectures = config.get("architectures") or ["?"]
    return {
        "architecture": str(architectures[0]),
        "hidden_size": int(config.get("hidden_size", 0)),
        "vocab_size": int(config.get("vocab_size", 0)),
        "num_hidden_layers": int(config.get("num_hidden_layers", 0)),
        "tokenizer_sha256": tokenizer_sha256(model),
    }


def tokenizer_sha256(model: Path) -> str:
    """A digest of the tokenizer's vocabulary and of how it splits a probe text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    probe = list(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    payload = json.dumps({"vocab": vocab, "probe": probe}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@contextmanager
def _tensors(model: Path) -> Iterator[dict[str, Any]]:
    """Every tensor name of the checkpoint mapped to an open safetensors handle."""
    files = sorted(model.glob("*.safetensors"))
    if not files:
        raise ProbeError(f"{model} has no .safetensors weights to fingerprint")
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                handles[name] = handle
        yield handles


def _seed(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)


def _positions(name: str, shape: list[int], count: int) -> list[list[int]]:
    """``count`` fixed (row, column) positions of a tensor, chosen from its name."""
    generator = torch.Generator().manual_seed(_seed(name))
    rows = shape[0] if shape else 1
    cols = shape[1] if len(shape) > 1 else 1
    picked = torch.randint(rows * cols, (count,), generator=generator).tolist()
    return [[p // cols, p % cols] for p in picked]


def _read(handle: Any, name: str, positions: list[list[int]]) -> list[float]:
    sliced = handle.get_slice(name)
    shape = sliced.get_shape()
    values = []
    for row, col in positions:
        if len(shape) == 1:
            values.append(float(sliced[row : row + 1].to(torch.float32)[0]))
        else:
            values.append(float(sliced[row : row + 1].to(torch.float32).reshape(-1)[col]))
    return values


def _is_float(handle: Any, name: str) -> bool:
    return str(handle.get_slice(name).get_dtype()) in {"F32", "F16", "BF16"}


def weights(model: Path) -> dict[str, Any]:
    """Sampled weights: rows of ``embed_tokens``, the final norm, and elements of every float tensor."""
    with _tensors(model) as handles:
        for needed in (EMBED, FINAL_NORM):
            if needed not in handles:
                raise ProbeError(f"{model} has no {needed} tensor to fingerprint")
        embed_shape = handles[EMBED].get_slice(EMBED).get_shape()
        generator = torch.Generator().manual_seed(_seed(EMBED))
        rows = torch.randperm(embed_shape[0], generator=generator)[:EMBED_ROWS].tolist()
        cols = torch.randperm(embed_shape[1], generator=generator)[:EMBED_COLS].tolist()
        norm_cols = torch.randperm(embed_shape[1], generator=generator)[:NORM_COLS].tolist()
        tensors = {}
        for name in sorted(handles):
            handle = handles[name]
            if name in (EMBED, FINAL_NORM) or not _is_float(handle, name):
                continue
            shape = list(handle.get_slice(name).get_shape())
            positions = _positions(name, shape, PER_TENSOR)
            tensors[name] = {"shape": shape, "positions": positions, "values": _read(handle, name, positions)}
        return {
            "embed_tokens": {
                "rows": rows,
                "cols": cols,
                "values": [_read(handles[EMBED], EMBED, [[r, c] for c in cols]) for r in rows],
            },
            "final_norm": {
                "cols": norm_cols,
                "values": _read(handles[FINAL_NORM], FINAL_NORM, [[c, 0] for c in norm_cols]),
            },
            "tensors": tensors,
        }


@dataclass(frozen=True)
class WeightMatch:
    """How many sampled values of a group agree within tolerance."""

    group: str
    compared: int
    mismatched: int
    worst: float  # largest |a - b| / (rtol |a| + atol); above 1 is a mismatch

    @property
    def mismatch_fraction(self) -> float:
        return self.mismatched / self.compared if self.compared else 0.0


# Re-saving in another 16-bit format rounds weights by up to 2^-8 relative (bf16); anything a
# fine-tune or an unrelated adapter changes moves them further.
RTOL = 1e-2


def _match(group: str, expected: list[float], actual: list[float]) -> WeightMatch:
    scale = math.sqrt(sum(v * v for v in expected) / max(len(expected), 1))
    atol = 1e-3 * scale + 1e-8
    ratios = [abs(a - e) / (RTOL * abs(e) + atol) for e, a in zip(expected, actual, strict=True)]
    return WeightMatch(group, len(ratios), sum(r > 1.0 for r in ratios), max(ratios, default=0.0))


def compare_weights(expected: Mapping[str, Any], model: Path, *, quantized: bool) -> list[WeightMatch]:
    """Compare a recorded fingerprint with a checkpoint's tensors.

    ``quantized``: only the tensors AWQ leaves alone (embeddings, final norm) are compared;
    otherwise also the sampled elements of every recorded tensor the checkpoint holds.
    """
    matches = []
    with _tensors(model) as handles:
        for needed in (EMBED, FINAL_NORM):
            if needed not in handles:
                raise ProbeError(f"{model} has no {needed} tensor")
        embed = expected["embed_tokens"]
        got = [_read(handles[EMBED], EMBED, [[r, c] for c in embed["cols"]]) for r in embed["rows"]]
        flat_expected = [v for row in embed["values"] for v in row]
        matches.append(_match("embed_tokens", flat_expected, [v for row in got for v in row]))
        norm = expected["final_norm"]
        got_norm = _read(handles[FINAL_NORM], FINAL_NORM, [[c, 0] for c in norm["cols"]])
        matches.append(_match("final_norm", norm["values"], got_norm))
        if not quantized:
            compared = mismatched = 0
            worst = 0.0
            for name, record in expected.get("tensors", {}).items():
                handle = handles.get(name)
                if handle is None or list(handle.get_slice(name).get_shape()) != record["shape"]:
                    compared += len(record["values"])  # a tensor that is gone or reshaped differs
                    mismatched += len(record["values"])
                    worst = math.inf
                    continue
                match = _match(name, record["values"], _read(handle, name, record["positions"]))
                compared += match.compared
                mismatched += match.mismatched
                worst = max(worst, match.worst)
            matches.append(WeightMatch("layers", compared, mismatched, worst))
    return matches
