"""Span decoding: from the pointers' token indices to an exact substring of the utterance.

The value is always cut from the utterance by the tokenizer's character offsets, never decoded
from token ids, so it cannot contain text the caller did not send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A value cut from the utterance; ``utterance[char_start:char_end] == value``."""

    char_start: int
    char_end: int
    value: str


def decode_span(utterance: str, offsets: Sequence[tuple[int, int]], token_start: int, token_end: int) -> Span:
    """Cut the characters covered by tokens ``token_start..token_end`` (inclusive).

    Byte-level tokenizers fold the preceding space into a word's token; that whitespace is
    trimmed so the value is the word itself. A span of whitespace alone keeps its raw offsets.
    """
    if not 0 <= token_start <= token_end < len(offsets):
        raise ValueError(f"token span {token_start}..{token_end} outside 0..{len(offsets) - 1}")
    begin = offsets[token_start][0]
    stop = max(offsets[token_end][1], begin)
    raw = utterance[begin:stop]
    stripped = raw.strip()
    if stripped:
        begin += len(raw) - len(raw.lstrip())
        stop = begin + len(stripped)
    return Span(char_start=begin, char_end=stop, value=utterance[begin:stop])
