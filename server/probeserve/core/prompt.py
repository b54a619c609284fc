"""Prompt building: the token layout the probe heads were trained on.

Token ids are the concatenation of separately tokenized pieces (no special tokens)::

    "Function: {function}\\n" | utterance | "\\n\\n" | "{slot_1}:" "\\n" | "{slot_2}:" "\\n" | ...

with slots in sorted name order. The utterance itself is tokenized in the bundle's
``utterance_segmentation`` layout (one piece, or cut at word/punctuation boundaries first:
``probeserve.core.segmentation``). A slot's query position is the last token of its ``"{slot}:"``
piece; the utterance tokens are the only positions a pointer may choose. Everything but the
utterance depends on the function alone, so it is tokenized once per function at start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from probeserve.core import segmentation
from probeserve.core.bundle import Bundle, FunctionSchema

PROMPT_FORMAT_VERSION = 1
# Word/punctuation pieces repeat across utterances (" the", ",", " to"), and a piece's tokens do
# not depend on its neighbours, so each builder remembers this many recent pieces' tokenizations:
# a request then costs dict lookups instead of one tokenizer call per word (about 20 a request).
PIECE_CACHE_SIZE = 1 << 15


class PieceTokenizer(Protocol):
    """What prompt building needs from a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` without special tokens, and each token's character offsets."""
        ...


@dataclass(frozen=True)
class FunctionTemplate:
    """The pre-tokenized fixed parts of one function's prompt."""

    function: str
    slot_names: tuple[str, ...]
    header_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    # Query positions relative to the start of ``suffix_ids``.
    suffix_query_offsets: tuple[int, ...]


@dataclass(frozen=True)
class Prompt:
    """One request's token ids and where the heads read them."""

    token_ids: list[int]
    slot_names: tuple[str, ...]
    query_positions: list[int]
    utterance_start: int
    utterance_end: int
    utterance_offsets: list[tuple[int, int]]

    @property
    def utterance_tokens(self) -> int:
        return self.utterance_end - self.utterance_start


def build_template(tokenizer: PieceTokenizer, schema: FunctionSchema) -> FunctionTemplate:
    """Tokenize the parts of a function's prompt that do not depend on the utterance."""
    header = tokenizer.encode(f"Function: {schema.name}\n")
    suffix = list(tokenizer.encode("\n\n"))
    offsets: list[int] = []
    newline = tokenizer.encode("\n")
    for slot in schema.slot_names:
        marker = tokenizer.encode(f"{slot}:")
        if not marker:
            raise ValueError(f"slot marker {slot!r}: tokenizes to nothing")
        suffix.extend(marker)
        offsets.append(len(suffix) - 1)
        suffix.extend(newline)
    return FunctionTemplate(
        function=schema.name,
        slot_names=schema.slot_names,
        header_ids=tuple(header),
        suffix_ids=tuple(suffix),
        suffix_query_offsets=tuple(offsets),
    )


class PromptBuilder:
    """Builds prompts for a bundle's functions; templates are made once, at construction."""

    def __init__(
        self, tokenizer: PieceTokenizer, functions: Mapping[str, FunctionSchema], utterance_segmentation: str
    ) -> None:
        self._tokenizer = tokenizer
        self._templates = {name: build_template(tokenizer, fn) for name, fn in functions.items()}
        self.utterance_segmentation = segmentation.check_layout(utterance_segmentation)
        self._one_piece = utterance_segmentation == segmentation.NATURAL
        self._piece = functools.lru_cache(maxsize=PIECE_CACHE_SIZE)(self._tokenize_piece)

    @classmethod
    def for_bundle(cls, tokenizer: PieceTokenizer, bundle: Bundle) -> PromptBuilder:
        """The prompts of a bundle's functions, in the utterance layout it was trained with."""
        return cls(tokenizer, bundle.functions, bundle.utterance_segmentation)

    def template(self, function: str) -> FunctionTemplate:
        return self._templates[function]

    def fixed_tokens(self, function: str) -> int:
        """How many prompt tokens the function's fixed parts take."""
        t = self._templates[function]
        return len(t.header_ids) + len(t.suffix_ids)

    def build(self, function: str, utterance: str) -> Prompt:
        template = self._templates[function]
        if self._one_piece:
            utterance_ids, offsets = self._tokenizer.encode_with_offsets(utterance)
        else:
            utterance_ids, offsets = segmentation.tokenize_utterance(
                utterance, self.utterance_segmentation, self._piece
            )
        return assemble(template, utterance_ids, offsets)

    def _tokenize_piece(self, piece: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        # Tuples: the cache hands the same value to every caller, so it must not be mutable.
        ids, offsets = self._tokenizer.encode_with_offsets(piece)
        return tuple(ids), tuple(offsets)


def assemble(
    template: FunctionTemplate,
    utterance_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
) -> Prompt:
    """Join a function template and a tokenized utterance into a prompt."""
    start = len(template.header_ids)
    end = start + len(utterance_ids)
    token_ids = [*template.header_ids, *utterance_ids, *template.suffix_ids]
    return Prompt(
        token_ids=token_ids,
        slot_names=template.slot_names,
        query_positions=[end + o for o in template.suffix_query_offsets],
        utterance_start=start,
        utterance_end=end,
        utterance_offsets=list(offsets),
    )
