"""The reference computation: the recipe's formulas in plain transformers + peft, one slot at a time.

Deliberately independent of the serving path (its own prompt assembly, its own head math, no
vLLM), so that agreement between the two is evidence, not an echo. Used by the parity tests and
by ``scripts/evaluate.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probeserve.core.bundle import Bundle
from probeserve.core.segmentation import pieces
from probeserve.core.spans import decode_span


@dataclass(frozen=True)
class ReferenceSlot:
    name: str
    present: bool
    presence_probability: float
    token_start: int
    token_end: int
    start_probability: float
    end_probability: float
    value: str | None
    presence_margin: float  # |logit_present - logit_absent|
    start_margin: float  # gap between the best and second-best start score
    end_margin: float


class ReferenceModel:
    """Base model + the bundle's LoRA adapter in transformers/peft, in float32 by default."""

    def __init__(self, model_dir: str | Path, bundle: Bundle, dtype: torch.dtype = torch.float32) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.bundle = bundle
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model = PeftModel.from_pretrained(base, str(bundle.adapter_path)).eval()

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        """Final-layer hidden states after the final norm, [T, d], float32, not normalised."""
        # The decoder stack without the LM head: its last_hidden_state is after the final norm.
        decoder: Any = self.model.get_base_model().model
        out = decoder(input_ids=torch.tensor([token_ids]))
        hidden: torch.Tensor = out.last_hidden_state[0].to(torch.float32)
        return hidden

    def _utterance(self, utterance: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The utterance's ids and character offsets in the bundle's layout: each piece through
        the tokenizer's own call (not the serving path's Rust shortcut), offsets shifted back."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for begin, stop in pieces(utterance, self.bundle.utterance_segmentation):
            enc = self.tokenizer(utterance[begin:stop], add_special_tokens=False, return_offsets_mapping=True)
            ids += list(enc["input_ids"])
            offsets += [(begin + int(a), begin + int(b)) for a, b in enc["offset_mapping"]]
        return ids, offsets

    @torch.no_grad()
    def extract(self, function: str, utterance: str) -> list[ReferenceSlot]:
        utt_ids, offsets = self._utterance(utterance)
        ids = self._ids(f"Function: {function}\n")
        u0 = len(ids)
        ids += utt_ids
        u1 = len(ids)
        ids += self._ids("\n\n")
        slots = [s.name for s in self.bundle.functions[function].slots]
        queries = []
        for slot in sorted(slots):
            ids += self._ids(f"{slot}:")
            queries.append(len(ids) - 1)
            ids += self._ids("\n")
        h = self.hidden_states(ids)
        heads = self.bundle.heads
        d = h.shape[-1]
        results = []
        for slot, q in zip(sorted(slots), queries, strict=True):
            hq = h[q]
            logits = heads.null_weight @ hq + heads.null_bias
            present = int(torch.argmax(logits)) == 0
            s = torch.stack([(heads.start_weight @ hq) @ h[t] for t in range(u0, u1)]) / math.sqrt(d)
            e = torch.stack([(heads.end_weight @ hq) @ h[t] for t in range(u0, u1)]) / math.sqrt(d)
            start = int(torch.argmax(s))
            end = max(int(torch.argmax(e)), start)
            value = decode_span(utterance, offsets, start, end).value if present else None
            results.append(
                ReferenceSlot(
                    name=slot,
                    present=present,
                    presence_probability=float(torch.softmax(logits, -1)[0]),
                    token_start=start,
                    token_end=end,
                    start_probability=float(torch.softmax(s, -1)[start]),
                    end_probability=float(torch.softmax(e, -1)[end]),
                    value=value,
                    presence_margin=float((logits[0] - logits[1]).abs()),
                    start_margin=_margin(s),
                    end_margin=_margin(e),
                )
            )
        return results


def _margin(scores: torch.Tensor) -> float:
    if scores.numel() < 2:
        return math.inf
    top = torch.topk(scores, 2).values
    return float(top[0] - top[1])
