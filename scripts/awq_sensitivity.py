"""Which decoder layers of an AWQ checkpoint to keep in full precision, measured on training prompts.

    .tools/awq/bin/python scripts/awq_sensitivity.py --model SRC --checkpoint AWQ --bundle DIR \\
        [--samples 64] [--skip 128] [--blocks] [--top 4] [--json OUT]

Why it exists: ``quantize_awq.py --keep-full-precision`` leaves some layers unquantized, and which
ones should be picked by measurement, not by guessing, and never on the prompts the result is
judged on. This loads the float model (the source, with the bundle's LoRA adapter folded in when the
checkpoint's record says it was, as ``--merge-adapter`` does) and the checkpoint's INT4 weights
dequantized, runs ``--samples`` xLAM *training* prompts through both (as the server builds them,
in the bundle's layout), and measures the relative error of the final hidden states (what the probe
heads read): ``|H_q - H_f| / |H_f|`` over all prompts' tokens. Then, one decoder layer at a time
(``--blocks``: also its attention and its MLP apart), it puts that layer's float weights back into
the quantized model and measures again: the layer's *share of the error removed* is
``(e_all - e_restored) / e_all``. AWQ's smoothing stays inside a layer (input_layernorm -> q/k/v,
v -> o, post_attention_layernorm -> gate/up, up -> down), so a layer, or a block with its norm,
restored whole is self-consistent.

Prompts come from the training split only (``xlam_data.load_split``'s ``train``), in
quantize_awq's order (sha256 of function and utterance), after the first ``--skip``: by default
the 128 that quantize_awq calibrates on, so AWQ did not fit the prompts this measures; each is
checked to be no validation example. The output (``--json``, and a summary on stderr) lists every
layer's error and share, the ``--top`` layers by share, and the ``--keep-full-precision`` regex
that keeps them. The shares do not add up: restoring two layers removes less or more than the sum,
and requantizing with layers kept recalibrates the others; the pick is a ranking, to be confirmed
by evaluating the requantized checkpoint on validation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import quantize_awq as qa

from probeserve.core.checkpoint import QUANTIZATION_RECORD, adapter_files  # quantize_awq's sys.path

DEFAULT_SAMPLES = 64
DEFAULT_TOP = 4
DEFAULT_BATCH_SIZE = 16
LAYER_PREFIX = "model.layers."
# A decoder layer's blocks and the parameter-name prefixes (after "model.layers.N.") each holds:
# a block's norm goes with its Linears, since AWQ folds the Linears' input scales into it.
BLOCKS = {"attn": ("input_layernorm.", "self_attn."), "mlp": ("post_attention_layernorm.", "mlp.")}


def keep_regex(layers: list[int]) -> str:
    """The ``--keep-full-precision`` pattern (llm-compressor's ``re:`` form) naming these layers."""
    return "re:.*layers\\.(" + "|".join(str(i) for i in sorted(layers)) + ")\\..*"


def training_prompts(data_dir: Path, bundle: Path, samples: int, skip: int) -> qa.PromptSet:
    """``samples`` training prompts of the bundle's functions, after quantize_awq's first ``skip``."""
    import xlam_data

    schemas = json.loads((bundle / "function_schemas.json").read_text(encoding="utf-8"))
    picked = qa.xlam_prompts(data_dir, skip + samples, qa.bundle_layout(bundle), schemas)
    examples = picked.examples[skip:]
    if len(examples) < samples:
        raise SystemExit(f"only {len(examples)} training prompts after the first {skip}")
    for function, utterance in examples:  # xlam_prompts reads the training split; make sure
        if xlam_data.is_validation(function, utterance):
            raise SystemExit(f"validation example among the prompts: {function}: {utterance!r}")
    used = {function: schemas[function] for function, _ in examples}
    return qa.PromptSet(examples, used, picked.layout)


def dequantized_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's tensors in float32, its packed INT4 weights dequantized (kept ones as saved)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import (  # type: ignore[import-untyped]
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import (  # type: ignore[import-untyped]
        QuantizationArgs,
        QuantizationScheme,
    )
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    groups = list(config["config_groups"].values())
    if len(groups) != 1:
        raise SystemExit(f"{checkpoint}: {len(groups)} quantization groups; this reads one")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**groups[0]["weights"]))
    tensors: dict[str, Any] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    packed: dict[str, dict[str, Any]] = {}
    state: dict[str, Any] = {}
    for name, tensor in tensors.items():
        module, part = name.rsplit(".", 1)
        if f"{module}.weight_packed" in tensors:
            packed.setdefault(module, {})[part] = tensor
        else:
            state[name] = tensor.to(torch.float32)
    for module, parts in packed.items():
        weight = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        state[f"{module}.weight"] = weight.to(torch.float32)
    return state


def final_states(model: Any, batches: list[dict[str, Any]]) -> list[Any]:
    """Final hidden states (after the last norm) of each prompt's real tokens, padding dropped."""
    out = []
    for batch in batches:
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for row, mask in zip(hidden.last_hidden_state, batch["attention_mask"], strict=True):
            out.append(row[mask.bool()])
    return out


def relative_error(states: list[Any], reference: list[Any]) -> float:
    """``|H - H_ref| / |H_ref|`` (Frobenius) over all prompts' tokens."""
    num = sum(float(((a - b) ** 2).sum()) for a, b in zip(states, reference, strict=True))
    den = sum(float((b**2).sum()) for b in reference)
    return math.sqrt(num / den)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint's float source model")
    parser.add_argument("--checkpoint", type=Path, required=True, help="quantize_awq.py's output")
    parser.add_argument("--bundle", type=Path, required=True,
                        help="its functions and layout make the prompts; its adapter, if merged")  # fmt: skip
    parser.add_argument("--data", type=Path, help="xLAM data directory (default: ../shared/data/xlam)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="prompts (%(default)s)")
    parser.add_argument("--skip", type=int, default=qa.DEFAULT_SAMPLES,
                        help="training prompts to pass over first (%(default)s: those quantize_awq "
                        "calibrates on by default)")  # fmt: skip
    parser.add_argument("--blocks", action="store_true", help="also each layer's attention and MLP apart")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help="layers to suggest (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="(%(default)s)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.skip < 0 or args.top < 1 or args.batch_size < 1:
        parser.error("--samples, --top and --batch-size must be positive, --skip not negative")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quantize_awq.py: shared cores

    import xlam_data

    t0 = time.monotonic()
    source, checkpoint, bundle = args.model.resolve(), args.checkpoint.resolve(), args.bundle.resolve()
    record = json.loads((checkpoint / QUANTIZATION_RECORD).read_text())
    if record["source"]["files"] != qa.describe_source(source)["files"]:
        raise SystemExit(
            f"{checkpoint} was not made from {source} ({QUANTIZATION_RECORD} records other files)"
        )
    adapter = None
    if record.get("adapter"):  # made with --merge-adapter: the float reference is base + adapter
        adapter = bundle / qa.ADAPTER_DIR
        if adapter_files(adapter) != record["adapter"]["files"]:
            raise SystemExit(f"{checkpoint} folded another adapter than {adapter}")
    data_dir = (args.data or xlam_data.default_data_dir()).resolve()
    prompts = training_prompts(data_dir, bundle, args.samples, args.skip)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    token_ids = qa.prompt_token_ids(tokenizer, prompts)
    collate = qa.pad_batch(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    order = sorted(token_ids, key=len, reverse=True)  # alike lengths batch with little padding
    batches = [
        collate([{"input_ids": ids} for ids in order[i : i + args.batch_size]])
        for i in range(0, len(order), args.batch_size)
    ]
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    if adapter is not None:
        qa.fold_adapter(model, adapter)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    quant_state = dequantized_state(checkpoint)
    missing = sorted(k for k in float_state if k not in quant_state and k != "lm_head.weight")
    if missing:
        raise SystemExit(f"{checkpoint} lacks {missing[:3]}...")
    reference = final_states(model, batches)

    def error_with(restored: tuple[str, ...]) -> float:
        """The error with the float tensors whose names start with one of ``restored``."""
        state = {k: float_state[k] if k.startswith(restored) else v for k, v in quant_state.items()}
        model.load_state_dict(state, strict=False)
        return relative_error(final_states(model, batches), reference)

    full = error_with(())
    print(f"all quantized: relative error {full:.5f}", file=sys.stderr)
    layers, blocks = [], []
    for i in range(model.config.num_hidden_layers):
        prefix = f"{LAYER_PREFIX}{i}."
        e = error_with((prefix,))
        layers.append({"layer": i, "error": round(e, 6), "share_removed": round((full - e) / full, 4)})
        line = f"layer {i:2d}: {100 * (full - e) / full:+5.1f}%"
        for block, parts in BLOCKS.items() if args.blocks else ():
            eb = error_with(tuple(prefix + p for p in parts))
            share = (full - eb) / full
            blocks.append(
                {"layer": i, "block": block, "error": round(eb, 6), "share_removed": round(share, 4)}
            )
            line += f"  {block} {100 * share:+5.1f}%"
        print(line, file=sys.stderr, flush=True)
    ranked = sorted(layers, key=lambda r: -float(r["share_removed"]))
    top = sorted(int(r["layer"]) for r in ranked[: args.top])
    result = {
        "model": str(source),
        "checkpoint": str(checkpoint),
        "checkpoint_keep_full_precision": record.get("keep_full_precision", []),
        "adapter_folded": str(adapter) if adapter is not None else None,
        "prompts": {
            "split": "training",
            "source": str(data_dir),
            "skip": args.skip,
            "samples": len(prompts.examples),
            "tokens": sum(len(ids) for ids in token_ids),
            "utterance_segmentation": prompts.layout,
            "sha256": qa.texts_sha256(prompts.texts()),
        },
        "metric": "relative Frobenius error of the final hidden states over all prompt tokens",
        "error_all_quantized": round(full, 6),
        "layers": layers,
        **({"blocks": blocks} if args.blocks else {}),
        "top": top,
        "keep_full_precision": keep_regex(top),
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"top {args.top}: {top}  --keep-full-precision '{result['keep_full_precision']}'", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
