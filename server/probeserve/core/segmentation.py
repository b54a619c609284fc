"""How a bundle's prompt tokenizes the utterance: its ``utterance_segmentation`` layout.

A pointer head can only choose whole tokens. Byte-level BPE (SmolLM2's) fuses punctuation into
neighbouring tokens (``].``, ``!'``, ``],``), so with the utterance tokenized in one piece
(``natural``, the public recipe's layout) some gold values are unreachable: every token span
carries a stray character. ``word_punct`` first cuts the utterance at word/punctuation
boundaries and tokenizes each piece on its own, so that every value made of whole words and
punctuation marks is some token span. A bundle declares its layout in ``bundle.json``; training
and serving both tokenize through :func:`tokenize_utterance`, so they cannot disagree.

Standard library only: ``scripts/train_bundle.py`` imports it where probeserve's dependencies
are not installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

NATURAL = "natural"
WORD_PUNCT = "word_punct"
LAYOUTS = (NATURAL, WORD_PUNCT)
# A bundle without the field was trained by the public recipe, which tokenizes in one piece.
DEFAULT_LAYOUT = NATURAL
FIELD = "utterance_segmentation"

# A word (with the whitespace before it), one punctuation mark (likewise), or whitespace that
# nothing follows. Every character is matched, so the pieces tile the text.
_WORD_PUNCT = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")

Offsets = list[tuple[int, int]]
# Tokenizes one piece without special tokens: its ids and each token's (start, end) in the piece.
PieceTokenizer = Callable[[str], tuple[Sequence[int], Sequence[tuple[int, int]]]]


def check_layout(layout: object) -> str:
    """``layout`` if it is a known layout name; a ``ValueError`` naming the field otherwise."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{FIELD} must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout


def pieces(text: str, layout: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` character ranges ``text`` is tokenized in; they tile it exactly.

    ``natural`` is the whole text as one piece; an empty text has no pieces in either layout.
    """
    if check_layout(layout) == NATURAL:
        return [(0, len(text))] if text else []
    return [m.span() for m in _WORD_PUNCT.finditer(text)]


def tokenize_utterance(text: str, layout: str, tokenize_piece: PieceTokenizer) -> tuple[list[int], Offsets]:
    """Token ids of ``text`` in ``layout`` and each token's character offsets within ``text``.

    Each piece is tokenized separately and the ids concatenated; offsets are shifted from the
    piece back to the utterance, which is what span decoding cuts values from.
    """
    ids: list[int] = []
    offsets: Offsets = []
    for start, end in pieces(text, layout):
        piece_ids, piece_offsets = tokenize_piece(text[start:end])
        if len(piece_ids) != len(piece_offsets):
            raise ValueError(f"tokenizer gave {len(piece_ids)} ids but {len(piece_offsets)} offsets")
        ids.extend(int(i) for i in piece_ids)
        offsets.extend((start + int(a), start + int(b)) for a, b in piece_offsets)
    return ids, offsets
