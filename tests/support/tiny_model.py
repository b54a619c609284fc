"""A tiny Llama-architecture model, LoRA adapter and probe bundle, made in seconds with no downloads.

The weights are random but seeded, so every run builds the same model. The adapter's B matrices
are non-zero: an engine that silently drops the LoRA gives different hidden states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

CORPUS = [
    "Book a flight from Paris to Tokyo on March 3rd for two adults.",
    "What's the weather in Berlin tomorrow, in celsius please?",
    "Find me a table for four at an Italian place near Union Square at 7pm.",
    "Convert 250 US dollars to euros and send the result to Maria.",
    "Set an alarm for 6:45 am on weekdays and call it gym.",
    "Function: book_flight\n",
    "date:\norigin:\ndestination:\npassengers:\ncity:\nunit:\n\n",
    "The quick brown fox jumps over the lazy dog 0123456789 times!",
    "Ünïcödé façade naïve café — résumé, 東京, Москва, 🙂 emoji.",
]

SCHEMAS = {
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
        },
    },
}

HIDDEN = 128
LORA_RANK = 8


@dataclass(frozen=True)
class TinyArtifacts:
    model_dir: Path
    bundle_dir: Path


def make_tokenizer(model_dir: Path) -> None:
    """A byte-level BPE tokenizer: any unicode text tokenizes, with character offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    fast.save_pretrained(str(model_dir))


def make_model(model_dir: Path, seed: int = 0) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(str(model_dir)))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    with torch.no_grad():  # non-unit norm weights, so hidden-state norms vary as in real models
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(str(model_dir), safe_serialization=True)


def make_adapter(model_dir: Path, adapter_dir: Path, seed: int = 1) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        lora_dropout=0.0,
        bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.15)
    peft_model.save_pretrained(str(adapter_dir))


def make_heads(seed: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    d = HIDDEN
    return {
        "null_head": {
            "classifier.weight": torch.randn(2, d, generator=gen) * 0.2,
            "classifier.bias": torch.zeros(2),
        },
        "pointer_head": {
            "W_start.weight": torch.randn(d, d, generator=gen) * 0.3,
            "W_end.weight": torch.randn(d, d, generator=gen) * 0.3,
        },
    }


def make_bundle(
    model_dir: Path,
    bundle_dir: Path,
    utterance_segmentation: str | None = None,
    *,
    name: str = "tiny",
    version: str = "1",
    seed: int = 0,
) -> None:
    """The tiny bundle; without ``utterance_segmentation`` its bundle.json has no such field, as a
    bundle straight from the public recipe (which means ``natural``). Another ``seed`` gives
    another adapter and other heads (a second task on the same model)."""
    bundle_dir.mkdir(parents=True, exist_ok=True)
    make_adapter(model_dir, bundle_dir / "lora_adapter", seed=1 + 10 * seed)
    torch.save(make_heads(seed=2 + 10 * seed), bundle_dir / "probe_heads.pt")
    (bundle_dir / "function_schemas.json").write_text(json.dumps(SCHEMAS, indent=1))
    manifest = {"name": name, "version": version}
    if utterance_segmentation is not None:
        manifest["utterance_segmentation"] = utterance_segmentation
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))


# Utterances for the pairing check's calibration references (`probeserve bundle pack`).
CALIBRATION = [
    ("book_flight", "Book a flight from Paris to Tokyo on March 3rd for two adults."),
    ("get_weather", "What's the weather in Berlin tomorrow, in celsius please?"),
    ("book_flight", "Fly me to Москва from 東京, one passenger."),
    ("get_weather", "Is it cold in Paris? Answer in fahrenheit."),
    ("book_flight", "Two adults from Berlin to Paris on weekdays."),
    ("get_weather", "weather for Union Square"),
    ("book_flight", "A table for four? No: a flight to Tokyo at 7pm."),
    ("get_weather", "Ünïcödé café weather, résumé style 🙂"),
]


def write_calibration(path: Path) -> Path:
    path.write_text("".join(json.dumps({"function": f, "utterance": u}) + "\n" for f, u in CALIBRATION))
    return path


def make_all(root: Path, pack: bool = True) -> TinyArtifacts:
    """The tiny model and its bundle; ``pack``: run `bundle pack` on it, as a release would."""
    model_dir, bundle_dir = root / "model", root / "bundle"
    model_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(model_dir)
    make_model(model_dir)
    make_bundle(model_dir, bundle_dir)
    if pack:
        pack_tiny(root, model_dir, bundle_dir)
    return TinyArtifacts(model_dir, bundle_dir)


def make_layout_bundle(
    tiny: TinyArtifacts,
    root: Path,
    utterance_segmentation: str | None,
    *,
    name: str = "tiny",
    seed: int = 0,
    version: str = "1",
    model_dir: Path | None = None,
) -> Path:
    """A tiny bundle declaring an utterance layout, packed: its calibration references are computed
    in that layout. ``seed`` 0 keeps the tiny bundle's adapter and heads; ``model_dir`` trains it
    for (and packs it against) another model than the tiny one."""
    model_dir = model_dir or tiny.model_dir
    bundle_dir = root / "bundle"
    make_bundle(model_dir, bundle_dir, utterance_segmentation, name=name, seed=seed, version=version)
    pack_tiny(root, model_dir, bundle_dir)
    return bundle_dir


def pack_tiny(root: Path, model_dir: Path, bundle_dir: Path) -> None:
    from probeserve.pairing.pack import pack as pack_bundle

    pack_bundle(bundle_dir, model_dir, write_calibration(root / "calibration.jsonl"), len(CALIBRATION))
    set_tolerance(bundle_dir, "awq", min_decision_agreement=AWQ_MIN_DECISION_AGREEMENT)


# The tiny bundle's heads are random, so many of its reference decisions are coin flips (top-2
# scores nearly equal) that any 4-bit rounding turns over: its own AWQ checkpoint agrees on 16 of
# 24 calibration slots (score error 0.26), the AWQ of a different fine-tune on 3 of 24 (score
# error 1.26). A trained bundle's decisions are confident and keep the default (0.9). Bundles
# carry their own tolerances in pairing.json, as this one does.
AWQ_MIN_DECISION_AGREEMENT = 0.5


def set_tolerance(bundle_dir: Path, precision: str, **limits: float) -> None:
    path = bundle_dir / "pairing.json"
    pairing = json.loads(path.read_text())
    pairing["tolerances"][precision].update(limits)
    path.write_text(json.dumps(pairing, separators=(",", ":")) + "\n")


def make_lookalike(model_dir: Path, out_dir: Path, how: str) -> Path:
    """A "different fine-tune" of the tiny model: same architecture and tokenizer, other weights.

    ``lora``: an unrelated LoRA adapter merged into the base; ``steps``: a few full fine-tuning
    steps of causal-LM training on the corpus.
    """
    import shutil

    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if how == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(7)
        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "v_proj"])
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.15)
        model = cast("LlamaForCausalLM", peft_model.merge_and_unload())
    elif how == "steps":
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(7)
        model.train()
        for text in CORPUS[:5]:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()  # type: ignore[no-untyped-call]
    else:
        raise ValueError(f"unknown look-alike {how!r}")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)
    return out_dir


if __name__ == "__main__":
    import sys

    print(make_all(Path(sys.argv[1])))
