"""The pairing check's parts, without an engine: fingerprints, refusals, and the function checks
fed by the transformers reference (exact, normalised, adapter dropped).

The end-to-end refusals through ``probeserve serve`` / ``check-pairing`` with the real engine
are in test_precision.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from probeserve.core.bundle import Bundle, load_bundle
from probeserve.core.errors import BundleError
from probeserve.core.prompt import PromptBuilder
from probeserve.core.tokenization import HfPieceTokenizer
from probeserve.engines.merge import merged_checkpoint
from probeserve.pairing import calibration
from probeserve.pairing.checks import Check, function_checks, static_checks
from probeserve.pairing.reference import ReferenceModel
from tests.support.tiny_model import TinyArtifacts, make_heads, make_lookalike


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _failed(checks: list[Check]) -> list[str]:
    return [c.name for c in checks if not c.passed]


def test_pack_records_the_source(tiny: TinyArtifacts, tiny_bundle: Bundle) -> None:
    pairing = tiny_bundle.pairing
    assert pairing is not None
    assert pairing["structure"]["hidden_size"] == tiny_bundle.hidden_size
    assert set(pairing["source"]["files"]) == {"model.safetensors"}
    assert pairing["weights"]["tensors"], "every float tensor is sampled"
    entry = pairing["calibration"]
    examples = calibration.load(tiny.bundle_dir / entry["file"], entry["sha256"])
    assert len(examples) == entry["examples"] == 8
    # The references differ with and without the adapter: the adapter check has something to see.
    for example in examples:
        assert not torch.allclose(example.with_adapter.flat(), example.without_adapter.flat(), atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "awq"])
def test_source_model_passes_static_checks(tiny: TinyArtifacts, tiny_bundle: Bundle, precision: str) -> None:
    checks = static_checks(tiny_bundle, tiny.model_dir, precision)
    assert _failed(checks) == []
    names = set(_by_name(checks))
    assert {"structure.tokenizer_sha256", "provenance.embed_tokens", "provenance.final_norm"} <= names
    # At awq only the tensors AWQ leaves alone can be compared.
    assert ("provenance.layers" in names) == (precision != "awq")


@pytest.mark.parametrize("how", ["lora", "steps"])
def test_different_finetune_is_refused_at_full_precision(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path, how: str
) -> None:
    lookalike = make_lookalike(tiny.model_dir, tmp_path / how, how)
    checks = static_checks(tiny_bundle, lookalike, "fp32")
    failed = _failed(checks)
    assert "provenance.layers" in failed
    layers = _by_name(checks)["provenance.layers"]
    assert "sampled weights differ" in layers.measured and "different fine-tune" in layers.detail
    # Same architecture and tokenizer: only provenance tells them apart.
    assert all(name.startswith("provenance.") for name in failed)


def test_heads_that_do_not_fit_are_refused(tiny: TinyArtifacts, tmp_path: Path) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny.bundle_dir, bundle_dir)
    heads = make_heads()
    heads["null_head"]["classifier.weight"] = heads["null_head"]["classifier.weight"][:, :64]
    for name in ("W_start.weight", "W_end.weight"):
        heads["pointer_head"][name] = heads["pointer_head"][name][:64, :64]
    torch.save(heads, bundle_dir / "probe_heads.pt")
    check = static_checks(load_bundle(bundle_dir), tiny.model_dir, "fp32")[0]
    assert (check.name, check.passed) == ("structure.heads_width", False)
    assert "128" in check.measured and "64" in check.threshold and "do not fit" in check.detail


def test_unpacked_bundle_is_refused_at_awq_only(tiny: TinyArtifacts, tmp_path: Path) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny.bundle_dir, bundle_dir)
    (bundle_dir / "pairing.json").unlink()
    bundle = load_bundle(bundle_dir)
    awq = _by_name(static_checks(bundle, tiny.model_dir, "awq"))["bundle.pairing"]
    assert not awq.passed and "probeserve bundle pack" in awq.detail
    assert _failed(static_checks(bundle, tiny.model_dir, "fp32")) == []


def test_edited_calibration_file_is_refused(tiny: TinyArtifacts, tmp_path: Path) -> None:
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny.bundle_dir, bundle_dir)
    path = bundle_dir / "calibration.json"
    raw = json.loads(path.read_text())
    raw["examples"][0]["utterance"] += "!"
    path.write_text(json.dumps(raw))
    bundle = load_bundle(bundle_dir)
    assert bundle.pairing is not None
    with pytest.raises(BundleError, match="sha256"):
        calibration.load(path, bundle.pairing["calibration"]["sha256"])


class _ReferenceEngine:
    """Hidden states from the transformers reference, optionally normalised or without the adapter."""

    max_prompt_tokens = 512

    def __init__(self, reference: ReferenceModel, *, normalise: bool = False, adapter: bool = True) -> None:
        self.reference, self.normalise, self.adapter = reference, normalise, adapter

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        if self.adapter:
            hidden = self.reference.hidden_states(token_ids)
        else:
            with self.reference.model.disable_adapter():
                hidden = self.reference.hidden_states(token_ids)
        return torch.nn.functional.normalize(hidden, dim=-1) if self.normalise else hidden


@pytest.fixture(scope="module")
def reference(tiny: TinyArtifacts, tiny_bundle: Bundle) -> ReferenceModel:
    return ReferenceModel(tiny.model_dir, tiny_bundle)


@pytest.mark.parametrize(
    ("variant", "expected_failures"),
    [
        ({}, []),
        ({"normalise": True}, ["sanity.hidden_state_norm"]),
        ({"adapter": False}, ["sanity.adapter_applied"]),
    ],
)
def test_function_checks(
    tiny: TinyArtifacts,
    tiny_bundle: Bundle,
    reference: ReferenceModel,
    variant: dict[str, bool],
    expected_failures: list[str],
) -> None:
    prompts = PromptBuilder.for_bundle(HfPieceTokenizer.from_pretrained(tiny.model_dir), tiny_bundle)
    engine = _ReferenceEngine(reference, **variant)
    checks = asyncio.run(function_checks(tiny_bundle, prompts, engine, "fp32"))
    failed = _failed(checks)
    # The specific diagnosis comes first: it is the one a refusal names.
    assert failed[: len(expected_failures)] == expected_failures
    if not expected_failures:
        assert failed == []
        assert _by_name(checks)["function.logit_error"].measured.endswith("0.0000")


def test_merged_checkpoint_is_verified_and_cached(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path
) -> None:
    first = merged_checkpoint(tiny.model_dir, tiny_bundle.adapter_path, "float32", tmp_path)
    record = json.loads((first / "probeserve_merge.json").read_text())
    assert record["verification"]["relative_rms_error"] < 1e-5
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = merged_checkpoint(tiny.model_dir, tiny_bundle.adapter_path, "float32", tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = merged_checkpoint(tiny.model_dir, tiny_bundle.adapter_path, "bfloat16", tmp_path)
    assert other != first
    # A 16-bit merge is held to what the dtype costs the unmerged adapter (base weights rounded).
    rounded = json.loads((other / "probeserve_merge.json").read_text())["verification"]
    assert rounded["baseline_relative_rms_error"] > 0
    assert rounded["relative_rms_error"] <= rounded["tolerance"]
