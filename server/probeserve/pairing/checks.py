"""The pairing check: is this serving checkpoint the model the bundle was trained for?

Four groups of checks, each with a measured value and a threshold:

1. structure: architecture, hidden size (= the heads' width), vocabulary size, layer count and
   tokenizer fingerprint equal to what ``bundle pack`` recorded;
2. provenance: sampled weights equal to the source model's (at AWQ only ``embed_tokens`` and the
   final norm, which AWQ leaves alone, plus the quantizer's record of its source, if any, and
   of the LoRA adapter it folded into the weights, if it did: that must be the bundle's);
3. function: the serving engine + adapter + heads reproduce the bundle's calibration references
   (decision agreement and score error within the precision's tolerance);
4. sanity: marker-state norms near the references' (no normalisation) and scores far closer to
   the with-adapter references than to the without-adapter ones (the adapter is applied).

Groups 1-2 run before the engine starts; 3-4 run through the engine before SERVING. A failure
raises :class:`PairingError` naming the check, the measured value and the threshold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from probeserve.core.bundle import Bundle
from probeserve.core.checkpoint import (
    ADAPTER_FILES,
    adapter_files,
    folded_adapter,
    quantization_record,
    read_config,
)
from probeserve.core.errors import ErrorKind, ProbeError
from probeserve.core.extraction import HiddenStateEngine
from probeserve.core.prompt import PromptBuilder
from probeserve.pairing import calibration, fingerprint

log = structlog.get_logger(__name__)

PAIRING_FORMAT = 1
# Per precision: the least share of calibration slots whose decision (presence, and start/end
# where present) must equal the float32 reference's, and the largest relative RMS error of the
# heads' scores. Set from measurements (see README "Choosing a precision"); a bundle may carry
# its own in pairing.json's "tolerances".
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"min_decision_agreement": 0.98, "max_logit_error": 0.02},
    "fp16": {"min_decision_agreement": 0.95, "max_logit_error": 0.1},
    "bf16": {"min_decision_agreement": 0.95, "max_logit_error": 0.1},
    "awq": {"min_decision_agreement": 0.9, "max_logit_error": 0.35},
}
# Normalised states have norm 1, raw final-norm states tens: a factor of 2 either way is plenty.
NORM_RATIO_RANGE = (0.5, 2.0)
# Sampled weights that may differ before the checkpoint counts as another model.
MAX_WEIGHT_MISMATCH = 0.0


@dataclass(frozen=True)
class Check:
    """One check's outcome."""

    name: str
    passed: bool
    measured: str
    threshold: str
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        text = f"{mark} {self.name}: {self.measured} (threshold {self.threshold})"
        return f"{text} - {self.detail}" if self.detail else text


class PairingError(ProbeError):
    """The serving model is not the one the bundle was trained for (or cannot be shown to be)."""

    kind = ErrorKind.FAILED_PRECONDITION

    def __init__(self, check: Check) -> None:
        super().__init__(
            f"pairing check {check.name} failed: measured {check.measured}, threshold {check.threshold}"
            + (f"; {check.detail}" if check.detail else "")
        )
        self.check = check


def pairing_manifest(bundle: Bundle) -> Mapping[str, Any] | None:
    return bundle.pairing


def tolerances(bundle: Bundle, precision: str) -> dict[str, float]:
    section = pairing_manifest(bundle) or {}
    custom = section.get("tolerances", {}).get(precision, {})
    return {**DEFAULT_TOLERANCES[precision], **custom}


def raise_on_failure(checks: Sequence[Check]) -> None:
    for check in checks:
        if not check.passed:
            raise PairingError(check)


def static_checks(bundle: Bundle, model: Path, precision: str, lora_mode: str | None = None) -> list[Check]:
    """Structure and provenance: no engine needed.

    ``lora_mode``, when the caller says how the engine will apply the adapter, is checked against
    the checkpoint: one whose quantizer folded an adapter in must run with ``premerged`` (no
    adapter per request), any other must not (else the adapter is applied twice, or never).
    """
    config = read_config(model)
    width = int(config.get("hidden_size", 0))
    checks = [
        Check(
            "structure.heads_width",
            width == bundle.hidden_size,
            f"model hidden size {width}",
            f"= the heads' width {bundle.hidden_size}",
            "" if width == bundle.hidden_size else "the heads do not fit this model",
        )
    ]
    if lora_mode is not None:
        checks.append(_adapter_once(model, lora_mode))
    section = pairing_manifest(bundle)
    if section is None:
        advice = f"run `probeserve bundle pack {bundle.path} --model SOURCE_MODEL --calibration FILE`"
        if precision == "awq":
            checks.append(
                Check(
                    "bundle.pairing",
                    False,
                    "no pairing.json (an unpacked bundle)",
                    "required at awq",
                    f"an AWQ checkpoint can only be checked against the source model's fingerprint; {advice}",
                )
            )
        else:
            log.warning("unpacked_bundle", bundle=str(bundle.path), checked="hidden size only", advice=advice)
        return checks
    recorded = section["structure"]
    actual = fingerprint.structure(model)
    for key in fingerprint.STRUCTURE_KEYS:
        shown, wanted = (str(actual[key])[:16], str(recorded[key])[:16])
        checks.append(Check(f"structure.{key}", actual[key] == recorded[key], shown, f"= {wanted}"))
    quantized = precision == "awq"
    for match in fingerprint.compare_weights(section["weights"], model, quantized=quantized):
        checks.append(
            Check(
                f"provenance.{match.group}",
                match.mismatch_fraction <= MAX_WEIGHT_MISMATCH,
                f"{match.mismatched}/{match.compared} sampled weights differ",
                f"{MAX_WEIGHT_MISMATCH:.0%} may differ",
                "" if match.mismatched == 0 else "not the source model's weights (a different fine-tune?)",
            )
        )
    checks.extend(_quantization_record(section, model, bundle.adapter_path))
    return checks


PREMERGED = "premerged"  # the engine's LoRA mode for a checkpoint that already holds the adapter


def _adapter_once(model: Path, lora_mode: str) -> Check:
    """The adapter is applied exactly once: folded into the checkpoint, or by the engine."""
    folded = folded_adapter(model) is not None
    ok = folded == (lora_mode == PREMERGED)
    held = "holds the adapter folded in" if folded else "holds no adapter"
    return Check(
        "structure.adapter_applied_once",
        ok,
        f"checkpoint {held}, lora_mode {lora_mode}",
        f"lora_mode {PREMERGED} if and only if the checkpoint holds the adapter",
        ""
        if ok
        else (
            "the engine would apply the adapter a second time"
            if folded
            else "the adapter would never be applied"
        ),
    )


def _quantization_record(section: Mapping[str, Any], model: Path, adapter: Path) -> list[Check]:
    """A checkpoint made by scripts/quantize_awq.py says what it was quantized from: it must be the source.

    When the quantizer folded a LoRA adapter into the weights first (``--merge-adapter``), the
    record also holds that adapter's file digests: they must be the bundle's adapter's, so the
    checkpoint is shown to be the bundle's source model plus this adapter.
    """
    record = quantization_record(model)
    if record is None:
        return []
    source = record.get("source", {})
    recorded_files = section.get("source", {}).get("files", {})
    claimed = source.get("files", {})
    shared = [name for name in recorded_files if name.endswith(".safetensors") and name in claimed]
    same = bool(shared) and all(claimed[name] == recorded_files[name] for name in shared)
    checks = [
        Check(
            "provenance.quantized_from",
            same,
            f"quantized from {source.get('path', '?')} ({len(shared)} weight files compared)",
            "the bundle's source weights (sha256)",
            "" if same else "this AWQ checkpoint was quantized from another model",
        )
    ]
    folded = folded_adapter(model)
    if folded is not None:
        expected = adapter_files(adapter)
        claimed_adapter = folded.get("files", {})
        differing = sorted(name for name in ADAPTER_FILES if claimed_adapter.get(name) != expected.get(name))
        checks.append(
            Check(
                "provenance.adapter_folded",
                not differing,
                f"folded {folded.get('path', '?')} ({len(ADAPTER_FILES) - len(differing)}/"
                f"{len(ADAPTER_FILES)} adapter files equal)",
                "the bundle's lora_adapter files (sha256)",
                f"another adapter was folded into this checkpoint ({', '.join(differing)} differ)"
                if differing
                else "",
            )
        )
    return checks


async def function_checks(
    bundle: Bundle, prompts: PromptBuilder, engine: HiddenStateEngine, precision: str
) -> list[Check]:
    """Reproduce the calibration references through the engine."""
    section = pairing_manifest(bundle)
    if section is None:
        return []
    entry = section["calibration"]
    examples = calibration.load(bundle.path / entry["file"], entry.get("sha256"))

    async def served(index: int, example: calibration.CalibrationExample) -> calibration.HeadScores:
        prompt = prompts.build(example.function, example.utterance)
        hidden = await engine.hidden_states(f"pairing-{index}", prompt.token_ids)
        return calibration.head_scores(bundle.heads, prompt, hidden)

    scores = await asyncio.gather(*(served(i, e) for i, e in enumerate(examples)))
    agreement = calibration.compare(examples, scores)
    limits = tolerances(bundle, precision)
    low, high = NORM_RATIO_RANGE
    norm_ok = low <= agreement.norm_ratio <= high
    # Scores that reproduce the no-adapter references as well as a correct model reproduces the
    # with-adapter ones: the engine is running without the adapter.
    adapter_ok = agreement.logit_error_without_adapter > limits["max_logit_error"]
    log.info("pairing_function", precision=precision, **vars(agreement))
    # Sanity first: when they fail, they say more precisely what is wrong than agreement does.
    return [
        Check(
            "sanity.hidden_state_norm",
            norm_ok,
            f"marker-state norm {agreement.norm_ratio:.3f}x the reference's",
            f"{low}x..{high}x",
            "" if norm_ok else "the engine's hidden states are rescaled (normalised?)",
        ),
        Check(
            "sanity.adapter_applied",
            adapter_ok,
            f"score error against the no-adapter references {agreement.logit_error_without_adapter:.4f}",
            f"> {limits['max_logit_error']} at {precision}",
            "" if adapter_ok else "the outputs are the base model's: the LoRA adapter is not applied",
        ),
        Check(
            "function.decision_agreement",
            agreement.decision_agreement >= limits["min_decision_agreement"],
            f"{agreement.decision_agreement:.3f} of {agreement.slots} calibration slots agree",
            f">= {limits['min_decision_agreement']} at {precision}",
            f"presence agreement {agreement.presence_agreement:.3f}",
        ),
        Check(
            "function.logit_error",
            agreement.logit_error <= limits["max_logit_error"],
            f"relative score error {agreement.logit_error:.4f}",
            f"<= {limits['max_logit_error']} at {precision}",
        ),
    ]
