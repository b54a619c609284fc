"""The Hugging Face tokenizer behind prompt building (a fast tokenizer: offsets are required)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class HfPieceTokenizer:
    """Adapts a Hugging Face fast tokenizer to :class:`probeserve.core.prompt.PieceTokenizer`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.is_fast:
            raise ValueError("probeserve needs a fast tokenizer (tokenizer.json) for char offsets")
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> HfPieceTokenizer:
        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The Rust tokenizer itself: what ``tokenizer(text, return_offsets_mapping=True)`` runs,
        # without ~0.3 ms of Python around it per request (tests/test_prompt.py checks they agree).
        enc = self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)
