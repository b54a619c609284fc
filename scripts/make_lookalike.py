"""A "look-alike" of the demo model: same architecture and tokenizer, a different fine-tune.

    python scripts/make_lookalike.py                       # .cache/models/smollm2-135m-lookalike
    python scripts/make_lookalike.py --steps 50 --lr 2e-5

The reference recipe's silent failure was an AWQ checkpoint of a *different fine-tune* of the
same base model: it loaded, ran and answered, 17 points worse. This makes such a model from the
demo model by a few steps of full causal-LM fine-tuning on the training utterances (never the
validation ones), so the pairing check and the precision table can show what happens to it,
at full precision and (after scripts/quantize_awq.py) at AWQ.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xlam_data import load_split

from probeserve.cli import DEMO_MODEL, DEMO_MODELS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--out", type=Path, default=DEMO_MODELS / "smollm2-135m-lookalike")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    _schemas, train, _validation = load_split()
    texts = [e.utterance for e in train]
    random.Random(args.seed).shuffle(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = texts[step * args.batch_size : (step + 1) * args.batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()  # type: ignore[no-untyped-call]
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(args.out), safe_serialization=True)  # type: ignore[arg-type]
    # The tokenizer and config go along; the manifest (the source's fingerprint) does not.
    for path in args.model.iterdir():
        weights_or_manifest = path.name.endswith(".safetensors") or path.name == "manifest.json"
        if path.is_file() and not weights_or_manifest and not (args.out / path.name).exists():
            shutil.copy2(path, args.out / path.name)
    record = {
        "what": "a different fine-tune of the source model (a pairing-check fixture), not for serving",
        "source": str(args.model),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "lookalike.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
