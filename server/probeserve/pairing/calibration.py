"""Calibration references: the heads' raw scores on a few utterances, and how served scores compare.

``probeserve bundle pack`` runs the source model (transformers + peft, float32) once over a
handful of utterances and stores, per utterance, the heads' presence logits and start/end
scores with the adapter and without it. The pairing check reproduces them through the serving
engine: decisions that agree show the serving model is the one the heads were trained on;
scores far closer to the with-adapter references than to the without-adapter ones show the
adapter is applied; hidden-state norms near the references' show no normalisation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probeserve.core.errors import BundleError
from probeserve.core.heads import ProbeHeads
from probeserve.core.prompt import Prompt

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 1


@dataclass(frozen=True)
class HeadScores:
    """The heads' raw outputs for one prompt, and the mean norm of its slot-marker states."""

    null_logits: torch.Tensor  # [S, 2]
    start_scores: torch.Tensor  # [S, N]
    end_scores: torch.Tensor  # [S, N]
    marker_norm: float

    @property
    def present(self) -> list[bool]:
        return [bool(v) for v in (self.null_logits.argmax(-1) == 0).tolist()]

    @property
    def spans(self) -> list[tuple[int, int]]:
        start = self.start_scores.argmax(-1)
        end = torch.maximum(self.end_scores.argmax(-1), start)
        return list(zip(start.tolist(), end.tolist(), strict=True))

    def flat(self) -> torch.Tensor:
        parts = (self.null_logits, self.start_scores, self.end_scores)
        return torch.cat([part.reshape(-1) for part in parts])

    def to_json(self) -> dict[str, Any]:
        return {
            "null_logits": self.null_logits.tolist(),
            "start_scores": self.start_scores.tolist(),
            "end_scores": self.end_scores.tolist(),
            "marker_norm": self.marker_norm,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> HeadScores:
        return cls(
            null_logits=torch.tensor(raw["null_logits"], dtype=torch.float32),
            start_scores=torch.tensor(raw["start_scores"], dtype=torch.float32),
            end_scores=torch.tensor(raw["end_scores"], dtype=torch.float32),
            marker_norm=float(raw["marker_norm"]),
        )


def head_scores(heads: ProbeHeads, prompt: Prompt, hidden: torch.Tensor) -> HeadScores:
    """Apply the heads to one prompt's hidden states [T, d]."""
    hidden = hidden.to(torch.float32)
    queries = torch.tensor(prompt.query_positions, dtype=torch.long)
    out = heads.apply(hidden, queries, slice(prompt.utterance_start, prompt.utterance_end))
    norm = float(hidden.index_select(0, queries).norm(dim=-1).mean())
    return HeadScores(out.null_logits.cpu(), out.start_scores.cpu(), out.end_scores.cpu(), norm)


@dataclass(frozen=True)
class CalibrationExample:
    function: str
    utterance: str
    with_adapter: HeadScores
    without_adapter: HeadScores

    def to_json(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "utterance": self.utterance,
            "with_adapter": self.with_adapter.to_json(),
            "without_adapter": self.without_adapter.to_json(),
        }


def save(path: Path, examples: Sequence[CalibrationExample], reference: str) -> str:
    """Write the references; returns the file's sha256 (recorded in the manifest)."""
    payload = {
        "format": CALIBRATION_FORMAT,
        "reference": reference,
        "examples": [example.to_json() for example in examples],
    }
    data = (json.dumps(payload, separators=(",", ":")) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load(path: Path, sha256: str | None = None) -> list[CalibrationExample]:
    """Read references, checking the digest the manifest recorded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"the bundle manifest names {path.name}, which is missing") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(f"{path} does not match the sha256 the bundle manifest records for it")
    raw = json.loads(data)
    return [
        CalibrationExample(
            function=item["function"],
            utterance=item["utterance"],
            with_adapter=HeadScores.from_json(item["with_adapter"]),
            without_adapter=HeadScores.from_json(item["without_adapter"]),
        )
        for item in raw["examples"]
    ]


@dataclass(frozen=True)
class Agreement:
    """Served scores against the references, over all calibration slots."""

    slots: int
    presence_agreement: float  # share of slots with the same presence decision
    decision_agreement: float  # same presence and, where present, the same start and end token
    logit_error: float  # RMS(served - reference) / RMS(reference), with the adapter
    logit_error_without_adapter: float  # the same against the no-adapter references
    norm_ratio: float  # mean served marker-state norm / the references'


def _relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12))


def compare(examples: Sequence[CalibrationExample], served: Sequence[HeadScores]) -> Agreement:
    """How closely served scores reproduce the references."""
    slots = same_presence = same_decision = 0
    for example, got in zip(examples, served, strict=True):
        ref = example.with_adapter
        pairs = zip(ref.present, got.present, ref.spans, got.spans, strict=True)
        for ref_p, got_p, ref_span, got_span in pairs:
            slots += 1
            if ref_p == got_p:
                same_presence += 1
                same_decision += int(not ref_p or ref_span == got_span)
    got_all = torch.cat([s.flat() for s in served])
    with_ref = torch.cat([e.with_adapter.flat() for e in examples])
    without_ref = torch.cat([e.without_adapter.flat() for e in examples])
    ref_norm = sum(e.with_adapter.marker_norm for e in examples) / len(examples)
    got_norm = sum(s.marker_norm for s in served) / len(served)
    return Agreement(
        slots=slots,
        presence_agreement=same_presence / slots,
        decision_agreement=same_decision / slots,
        logit_error=_relative_rms(got_all, with_ref),
        logit_error_without_adapter=_relative_rms(got_all, without_ref),
        norm_ratio=got_norm / ref_norm,
    )
