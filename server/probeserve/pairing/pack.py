"""``probeserve bundle pack``: give a bundle straight from training what the pairing check needs.

The public recipe writes an adapter, heads and schemas, nothing about the model it trained on.
Packing runs that source model once (transformers + peft, float32) and writes into the bundle:
``calibration.json`` (reference head scores with and without the adapter) and ``pairing.json``
(structure, tokenizer and weight fingerprints, the source's file digests, the calibration
file's digest and the per-precision tolerances); ``bundle.json`` gets a name and version if
it had none.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from probeserve.core.bundle import MANIFEST_FILE, PAIRING_FILE, load_bundle
from probeserve.core.checkpoint import sha256_file
from probeserve.core.errors import BundleError
from probeserve.core.prompt import PromptBuilder
from probeserve.core.tokenization import HfPieceTokenizer
from probeserve.pairing import calibration, fingerprint
from probeserve.pairing.checks import DEFAULT_TOLERANCES, PAIRING_FORMAT
from probeserve.pairing.reference import ReferenceModel

log = structlog.get_logger(__name__)

DEFAULT_EXAMPLES = 32


def _manifest_fingerprint(model: Path) -> str | None:
    """The fingerprint scripts/demo_model.py writes into the model's manifest.json, if any."""
    path = model / "manifest.json"
    return json.loads(path.read_text()).get("fingerprint") if path.is_file() else None


def read_utterances(path: Path, functions: set[str], limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` lines of a JSONL file ({"function", "utterance"}) whose function the bundle has."""
    rows: list[tuple[str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            function, utterance = str(item["function"]), str(item["utterance"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}:{number}: expected {{'function', 'utterance'}}: {exc}") from None
        if function in functions and utterance.strip():
            rows.append((function, utterance))
        if len(rows) == limit:
            break
    if not rows:
        raise BundleError(f"{path} has no utterance for any of the bundle's functions")
    return rows


def pack(bundle_dir: Path, model: Path, utterances: Path, examples: int = DEFAULT_EXAMPLES) -> dict[str, Any]:
    """Write the calibration references and the pairing manifest; returns the pairing section."""
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    rows = read_utterances(utterances, set(bundle.functions), examples)
    prompts = PromptBuilder.for_bundle(HfPieceTokenizer.from_pretrained(model), bundle)
    reference = ReferenceModel(model, bundle)
    results = []
    for function, utterance in rows:
        prompt = prompts.build(function, utterance)
        with_adapter = reference.hidden_states(prompt.token_ids)
        with torch.no_grad(), reference.model.disable_adapter():
            without_adapter = reference.hidden_states(prompt.token_ids)
        results.append(
            calibration.CalibrationExample(
                function=function,
                utterance=utterance,
                with_adapter=calibration.head_scores(bundle.heads, prompt, with_adapter),
                without_adapter=calibration.head_scores(bundle.heads, prompt, without_adapter),
            )
        )
    calibration_sha = calibration.save(
        bundle.path / calibration.CALIBRATION_FILE, results, "transformers + peft, float32"
    )
    section: dict[str, Any] = {
        "format": PAIRING_FORMAT,
        "structure": fingerprint.structure(model),
        "weights": fingerprint.weights(model),
        "source": {
            "fingerprint": _manifest_fingerprint(model),
            "files": {p.name: sha256_file(p) for p in sorted(model.glob("*.safetensors"))},
        },
        "calibration": {
            "file": calibration.CALIBRATION_FILE,
            "sha256": calibration_sha,
            "examples": len(results),
            "utterances_from": utterances.name,
            "reference": "transformers + peft, float32",
        },
        "tolerances": DEFAULT_TOLERANCES,
    }
    pairing_json = json.dumps(section, separators=(",", ":")) + "\n"
    (bundle.path / PAIRING_FILE).write_text(pairing_json, encoding="utf-8")
    if not bundle.manifest:
        manifest = {"name": bundle.name, "version": bundle.version, "pairing": PAIRING_FILE}
        (bundle.path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info(
        "bundle_packed", bundle=str(bundle.path), model=str(model), examples=len(results),
        seconds=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    return section
