"""Llama-3.1-8B- and 70B-shaped checkpoints (config only), their AWQ twins, and random probe bundles.

For benchmarks with ``--load-format dummy``: vLLM builds the model from ``config.json`` and fills
the weights with random numbers, so no weights are needed. Writes, under ROOT::

    llama8b/          config.json (meta-llama/Llama-3.1-8B's), a small byte-level BPE tokenizer
    llama8b-awq/      the same with AutoAWQ's 4-bit GEMM config (group 128, zero point)
    bundle/           lora_adapter/ (rank 16 on q/k/v/o, random), probe_heads.safetensors
                      (width 4096, random), function_schemas.json, bundle.json

and with ``--shape 70b`` (Llama-3.1-70B: hidden 8192, 80 layers, 64 heads, 8 KV heads)
``llama70b/``, ``llama70b-awq/`` and ``bundle70b/`` (heads of width 8192) beside them; with
``--bundles N`` also ``bundles/b0`` ... ``bundles/b{N-1}``, N bundles for the same model with
adapters and heads of their own (several tasks on one model, scripts/bench/bundles_bench.py)::

    python scripts/bench/gpu/make_bundle.py ROOT                 # the 8B shape
    python scripts/bench/gpu/make_bundle.py ROOT --shape 70b     # the 70B shape
    python scripts/bench/gpu/make_bundle.py ROOT --small         # hidden 256, 2 layers: a CPU dry run
    python scripts/bench/gpu/make_bundle.py ROOT --bundles 8     # and 8 bundles of their own

Only torch, safetensors and tokenizers are needed (all on the GPU image); nothing is downloaded.
The tokenizer is trained on the benchmark's own utterances, so prompts come out near 60 tokens,
the length of the reference recipe's measurements.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# meta-llama/Llama-3.1-8B config.json (public).
LLAMA31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
# meta-llama/Llama-3.1-70B config.json (public): what differs from the 8B.
LLAMA31_70B_DIFF: dict[str, Any] = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
}
# Folder names per shape: model, its AWQ twin, bundle.
SHAPES: dict[str, tuple[str, str, str]] = {
    "8b": ("llama8b", "llama8b-awq", "bundle"),
    "70b": ("llama70b", "llama70b-awq", "bundle70b"),
}
# A CPU-sized model of the same architecture, for a dry run of the benchmark.
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 2048,
    "torch_dtype": "float32",
}
# AutoAWQ GEMM int4, group 128, zero point (as hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4).
AWQ = {
    "bits": 4,
    "group_size": 128,
    "modules_to_not_convert": None,
    "quant_method": "awq",
    "version": "gemm",
    "zero_point": True,
}
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

SCHEMAS: dict[str, Any] = {
    "book_flight": {
        "name": "book_flight",
        "description": "Book a flight.",
        "slots": {
            "origin": {"type": "str", "optional": False, "description": "Departure city."},
            "destination": {"type": "str", "optional": False, "description": "Arrival city."},
            "date": {"type": "str", "optional": True, "description": "Travel date."},
            "passengers": {"type": "int", "optional": True, "description": "How many travel."},
        },
    },
    "get_weather": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "slots": {
            "city": {"type": "str", "optional": False, "description": "The city."},
            "unit": {"type": "str", "optional": True, "description": "celsius or fahrenheit."},
            "day": {"type": "str", "optional": True, "description": "Which day."},
        },
    },
    "transfer_money": {
        "name": "transfer_money",
        "description": "Send money to someone.",
        "slots": {
            "amount": {"type": "float", "optional": False, "description": "How much."},
            "currency": {"type": "str", "optional": True, "description": "ISO currency code."},
            "recipient": {"type": "str", "optional": False, "description": "Who gets it."},
        },
    },
}
# (function, utterance): the benchmark cycles through these.
UTTERANCES: list[tuple[str, str]] = [
    (
        "book_flight",
        "Please book me a flight from Paris to Tokyo on March 3rd for two adults, "
        "economy class, and I would prefer a morning departure if one is available.",
    ),
    (
        "get_weather",
        "What is the weather going to be like in Berlin tomorrow afternoon? Please give "
        "me the temperature in celsius and tell me whether I should bring an umbrella.",
    ),
    (
        "transfer_money",
        "Send two hundred and fifty euros to Maria Gonzalez for the concert tickets she "
        "bought last week, and add a note saying thanks for organising everything.",
    ),
    (
        "book_flight",
        "I need to get from Chicago to Denver next Friday with my wife and our three kids, "
        "so that is five passengers in total; the cheapest option is fine for us.",
    ),
    (
        "get_weather",
        "Is it going to snow in Montreal over the weekend? My family is driving up on "
        "Saturday morning and I would like the forecast in fahrenheit if possible.",
    ),
    (
        "transfer_money",
        "Please wire 1200 US dollars to my landlord John Smith for the rent of this month "
        "before Friday, using the usual checking account as the source of the money.",
    ),
]


def _prompt_corpus() -> list[str]:
    texts = [utterance for _, utterance in UTTERANCES]
    for name, schema in SCHEMAS.items():
        texts.append(f"Function: {name}\n")
        texts += [f"{slot}:" for slot in schema["slots"]]
    return texts


def write_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (fast, with character offsets), trained on the benchmark's texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # A few hundred merges: the benchmark's words become one or two tokens each, so prompts are
    # about as long as with Llama-3's own tokenizer.
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 620),
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_prompt_corpus() * 4, trainer=trainer)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 131072,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_checkpoints(root: Path, small: bool, shape: str = "8b") -> dict[str, Any]:
    config = copy.deepcopy(LLAMA31_8B)
    if shape == "70b":
        config.update(LLAMA31_70B_DIFF)
    if small:
        config.update(SMALL)
        config["bos_token_id"] = config["eos_token_id"] = 0
        if shape == "70b":  # still twice as wide as the small 8B, so a width mix-up shows
            config.update(hidden_size=512, intermediate_size=1024, num_attention_heads=8)
    awq = dict(config, torch_dtype="float16", quantization_config=AWQ)
    model, awq_model, _ = SHAPES[shape]
    variants = {model: config, awq_model: awq}
    for name, cfg in variants.items():
        model_dir = root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(cfg, indent=1))
        write_tokenizer(model_dir, int(cfg["vocab_size"]))
    return config


def write_adapter(adapter_dir: Path, config: dict[str, Any], seed: int = 1) -> None:
    """A PEFT-format LoRA (rank 16 on q/k/v/o), written by hand: the key names and shapes peft uses."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    d = int(config["hidden_size"])
    kv = d // int(config["num_attention_heads"]) * int(config["num_key_value_heads"])
    out_features = {"q_proj": d, "k_proj": kv, "v_proj": kv, "o_proj": d}
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for module in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = torch.randn(LORA_RANK, d, generator=gen) * (1.0 / d**0.5)
            b = torch.randn(out_features[module], LORA_RANK, generator=gen) * 0.01
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.float16)
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.float16)
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(LORA_TARGETS),
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))


def write_bundle(
    bundle_dir: Path,
    config: dict[str, Any],
    seed: int = 2,
    shape: str = "8b",
    name: str = "",
    adapter_seed: int = 1,
) -> None:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    write_adapter(bundle_dir / "lora_adapter", config, seed=adapter_seed)
    d = int(config["hidden_size"])
    gen = torch.Generator().manual_seed(seed)
    heads = {
        "null_head.classifier.weight": torch.randn(2, d, generator=gen) * (1.0 / d**0.5),
        "null_head.classifier.bias": torch.zeros(2),
        "pointer_head.W_start.weight": torch.randn(d, d, generator=gen) * (1.0 / d**0.5),
        "pointer_head.W_end.weight": torch.randn(d, d, generator=gen) * (1.0 / d**0.5),
    }
    save_file(heads, str(bundle_dir / "probe_heads.safetensors"))
    (bundle_dir / "function_schemas.json").write_text(json.dumps(SCHEMAS, indent=1))
    manifest = {
        "name": name or f"bench-llama{shape}",
        "version": "1",
        "note": "random adapter and heads for latency benchmarks (scripts/bench/gpu/make_bundle.py)",
        "base_model": f"Llama-3.1-{shape.upper()} shape, dummy weights",
    }
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest, indent=1))


def make_all(root: Path, small: bool = False, shape: str = "8b", bundles: int = 0) -> dict[str, Path]:
    config = write_checkpoints(root, small, shape)
    model, awq_model, bundle = SHAPES[shape]
    write_bundle(root / bundle, config, shape=shape)
    made = {"model": root / model, "awq_model": root / awq_model, "bundle": root / bundle}
    for i in range(bundles):  # each its own adapter and heads: different tasks on one model
        made[f"b{i}"] = root / "bundles" / f"b{i}"
        write_bundle(made[f"b{i}"], config, seed=200 + i, shape=shape, name=f"b{i}", adapter_seed=100 + i)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--small", action="store_true", help="hidden 256, 2 layers (a CPU dry run)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--bundles", type=int, default=0, help="also write this many bundles of their own")
    args = parser.parse_args()
    made = make_all(args.root, args.small, args.shape, args.bundles)
    print(json.dumps({k: str(v) for k, v in made.items()}))


if __name__ == "__main__":
    main()
