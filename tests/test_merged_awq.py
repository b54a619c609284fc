"""A checkpoint quantized with the bundle's adapter folded in (``quantize_awq.py --merge-adapter``).

Its quantizer's fold must compute what peft's merge does; its record must name the adapter; and
the pairing check must accept it only when that adapter is the bundle's, and (function check) when
the model, run without a per-request adapter, reproduces the with-adapter references. Without an
engine: the folded model runs in transformers, as the reference does.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from probeserve.core.bundle import Bundle
from probeserve.core.checkpoint import QUANTIZATION_RECORD, adapter_files, folded_adapter, sha256_file
from probeserve.core.prompt import PromptBuilder
from probeserve.core.tokenization import HfPieceTokenizer
from probeserve.pairing.checks import Check, function_checks, static_checks
from tests.support.tiny_model import TinyArtifacts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import quantize_awq


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _folded_model(tiny: TinyArtifacts, bundle: Bundle) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32)
    assert quantize_awq.fold_adapter(model, bundle.adapter_path) == len(bundle_targets(bundle))
    model.eval()  # type: ignore[no-untyped-call]
    return model


def bundle_targets(bundle: Bundle) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(bundle.adapter_path / "adapter_model.safetensors"), framework="pt") as handle:
        names = handle.keys()
        return {name.split(".lora_")[0].removeprefix("base_model.model.") for name in names}


def test_fold_equals_peft_merge(tiny: TinyArtifacts, tiny_bundle: Bundle) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tiny_bundle.adapter_path)).merge_and_unload()
    folded = _folded_model(tiny, tiny_bundle)
    pristine = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32).state_dict()
    want, got = merged.state_dict(), folded.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6)
    # Every target weight moved (the tiny adapter's B is not zero), nothing else did.
    changed = {name.removesuffix(".weight") for name in got if not torch.equal(got[name], pristine[name])}
    assert changed == bundle_targets(tiny_bundle)


def test_fold_refuses_what_it_does_not_implement(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path
) -> None:
    adapter = tmp_path / "dora"
    shutil.copytree(tiny_bundle.adapter_path, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), dtype=torch.float32)
    with pytest.raises(SystemExit, match="use_dora"):
        quantize_awq.fold_adapter(model, adapter)


def _record(tiny: TinyArtifacts, adapter: Path) -> dict[str, Any]:
    """What quantize_awq.py --merge-adapter writes about its source and the adapter it folded."""
    return {
        "source": quantize_awq.describe_source(tiny.model_dir),
        "adapter": quantize_awq.describe_adapter(adapter),
        "scheme": "W4A16_ASYM",
    }


def _checkpoint_with_record(tiny: TinyArtifacts, out: Path, record: dict[str, Any]) -> Path:
    """A stand-in for the folded AWQ checkpoint: at awq the static checks read only embed_tokens,
    the final norm (which neither the fold of attention adapters nor AWQ changes) and the record."""
    shutil.copytree(tiny.model_dir, out)
    (out / QUANTIZATION_RECORD).write_text(json.dumps(record))
    return out


def test_record_names_the_folded_adapter(tiny: TinyArtifacts, tiny_bundle: Bundle) -> None:
    record = _record(tiny, tiny_bundle.adapter_path)
    assert record["adapter"]["files"] == {
        name: sha256_file(tiny_bundle.adapter_path / name)
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    # The up-to-date check tells a folded checkpoint from a base one, and adapters apart.
    base_only = {k: v for k, v in record.items() if k != "adapter"}
    assert quantize_awq.identity(record) != quantize_awq.identity(base_only)


def test_kept_layers_are_part_of_the_identity(tiny: TinyArtifacts, tiny_bundle: Bundle) -> None:
    record = _record(tiny, tiny_bundle.adapter_path)
    kept = {**record, "keep_full_precision": [r"re:.*layers\.1\..*"]}
    assert quantize_awq.identity(kept) != quantize_awq.identity(record)
    # A record from before --keep-full-precision quantized every Linear but lm_head: kept none.
    assert quantize_awq.identity({**record, "keep_full_precision": []}) == quantize_awq.identity(record)


def test_static_checks_accept_the_bundles_adapter_folded(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path
) -> None:
    model = _checkpoint_with_record(tiny, tmp_path / "folded", _record(tiny, tiny_bundle.adapter_path))
    assert folded_adapter(model) is not None
    checks = _by_name(static_checks(tiny_bundle, model, "awq"))
    assert [c.name for c in checks.values() if not c.passed] == []
    assert checks["provenance.quantized_from"].passed
    assert checks["provenance.adapter_folded"].measured.endswith("(2/2 adapter files equal)")


def test_static_checks_refuse_another_adapter_folded(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path
) -> None:
    other = tmp_path / "other-adapter"
    shutil.copytree(tiny_bundle.adapter_path, other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / "adapter_model.safetensors"))
    save_file({k: v * 1.5 for k, v in tensors.items()}, str(other / "adapter_model.safetensors"))
    assert adapter_files(other) != adapter_files(tiny_bundle.adapter_path)
    model = _checkpoint_with_record(tiny, tmp_path / "folded-other", _record(tiny, other))
    checks = _by_name(static_checks(tiny_bundle, model, "awq"))
    failed = [c for c in checks.values() if not c.passed]
    assert [c.name for c in failed] == ["provenance.adapter_folded"]
    assert "adapter_model.safetensors differ" in failed[0].detail


def test_base_checkpoint_has_no_adapter_check(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path
) -> None:
    record = {k: v for k, v in _record(tiny, tiny_bundle.adapter_path).items() if k != "adapter"}
    model = _checkpoint_with_record(tiny, tmp_path / "base", record)
    assert folded_adapter(model) is None
    names = set(_by_name(static_checks(tiny_bundle, model, "awq")))
    assert "provenance.quantized_from" in names and "provenance.adapter_folded" not in names


class _FoldedEngine:
    """Hidden states of a model with the adapter folded in, run with no adapter (what the engine
    would do with a pre-merged checkpoint)."""

    max_prompt_tokens = 512

    def __init__(self, model: Any) -> None:
        self.model = model

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.model(input_ids=torch.tensor([token_ids]))
        hidden: torch.Tensor = out.last_hidden_state[0].float()
        return hidden


def test_function_checks_accept_the_folded_model_without_an_adapter(
    tiny: TinyArtifacts, tiny_bundle: Bundle
) -> None:
    prompts = PromptBuilder.for_bundle(HfPieceTokenizer.from_pretrained(tiny.model_dir), tiny_bundle)
    engine = _FoldedEngine(_folded_model(tiny, tiny_bundle))
    checks = _by_name(asyncio.run(function_checks(tiny_bundle, prompts, engine, "fp32")))
    assert [c.name for c in checks.values() if not c.passed] == []
    # It reproduces the with-adapter references (not the base model's) as closely as fp32 allows.
    assert float(checks["function.logit_error"].measured.split()[-1]) < 1e-3


@pytest.mark.parametrize(
    ("folded", "lora_mode", "passes"),
    [
        (True, "premerged", True),
        (True, "adapter", False),
        (False, "adapter", True),
        (False, "premerged", False),
    ],
)
def test_the_adapter_is_applied_once(
    tiny: TinyArtifacts, tiny_bundle: Bundle, tmp_path: Path, folded: bool, lora_mode: str, passes: bool
) -> None:
    record = _record(tiny, tiny_bundle.adapter_path)
    if not folded:
        del record["adapter"]
    model = _checkpoint_with_record(tiny, tmp_path / "checkpoint", record)
    check = _by_name(static_checks(tiny_bundle, model, "awq", lora_mode=lora_mode))[
        "structure.adapter_applied_once"
    ]
    assert check.passed == passes, check.line()
    # Callers that do not say how the engine applies the adapter get no such check.
    assert "structure.adapter_applied_once" not in _by_name(static_checks(tiny_bundle, model, "awq"))


def test_sensitivity_measures_on_training_prompts_after_the_calibration_ones() -> None:
    """awq_sensitivity.py picks its prompts from the training split, after the ones quantize_awq
    calibrates on, none of them a validation example; its regex names exactly the layers given."""
    import re

    import awq_sensitivity
    import xlam_data

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "xlam-smollm2-135m-v2"
    data = xlam_data.default_data_dir()
    schemas = json.loads((bundle / "function_schemas.json").read_text(encoding="utf-8"))
    calibration = quantize_awq.xlam_prompts(data, 8, quantize_awq.bundle_layout(bundle), schemas).examples
    measured = awq_sensitivity.training_prompts(data, bundle, samples=16, skip=8).examples
    assert len(measured) == 16
    assert not set(measured) & set(calibration)
    assert not any(xlam_data.is_validation(f, u) for f, u in measured)
    pattern = re.compile(awq_sensitivity.keep_regex([29, 0, 23, 2]).removeprefix("re:"))
    kept = {i for i in range(30) if pattern.fullmatch(f"model.layers.{i}.mlp.down_proj")}
    assert kept == {0, 2, 23, 29}
