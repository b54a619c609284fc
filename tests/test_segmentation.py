"""Utterance segmentation: pieces tile the text, and word_punct makes punctuation-free values reachable.

Pure: the tokenizers here are stand-ins that fuse punctuation the way byte-level BPE does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probeserve.core import segmentation
from probeserve.core.segmentation import NATURAL, WORD_PUNCT, pieces, tokenize_utterance
from probeserve.core.spans import decode_span

# GPT-2's pre-tokenizer, one token per pre-token: a run of punctuation is one token and a space
# joins the next word or punctuation run, as in SmolLM2's "!'" and "]." tokens.
_GPT2_LIKE = re.compile(r" ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+")
_VOCAB: dict[str, int] = {}


def gpt2_like(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    spans = [m.span() for m in _GPT2_LIKE.finditer(text)]
    return [_VOCAB.setdefault(text[a:b], len(_VOCAB)) for a, b in spans], spans


def per_char(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    return [ord(c) for c in text], [(i, i + 1) for i in range(len(text))]


def reachable(text: str, offsets: Sequence[tuple[int, int]], value: str) -> bool:
    """Whether some token span decodes to ``value`` exactly."""
    n = len(offsets)
    return any(decode_span(text, offsets, s, e).value == value for s in range(n) for e in range(s, n))


TEXT = st.text(alphabet=st.sampled_from("ab1 _.,!?'\"[]()-\u00e9\u4e2d\t\n"), max_size=40)


@given(TEXT, st.sampled_from(segmentation.LAYOUTS))
def test_pieces_tile_the_text(text: str, layout: str) -> None:
    cut = pieces(text, layout)
    assert "".join(text[a:b] for a, b in cut) == text
    assert all(a < b for a, b in cut)
    assert [a for a, _ in cut] == [0, *(b for _, b in cut)][: len(cut)]


@given(TEXT)
def test_word_punct_pieces_hold_one_word_or_one_mark(text: str) -> None:
    for a, b in pieces(text, WORD_PUNCT):
        body = text[a:b].lstrip()
        assert body == "" or re.fullmatch(r"\w+", body) or (len(body) == 1 and not body.isspace())
        if body == "":
            assert b == len(text)  # whitespace alone only at the end


def test_natural_is_one_piece_and_tokenizes_as_before() -> None:
    text = "Calculate the median of the numbers [3, 5, 7, 9, 11]."
    assert pieces(text, NATURAL) == [(0, len(text))]
    assert pieces("", NATURAL) == pieces("", WORD_PUNCT) == []
    assert tokenize_utterance(text, NATURAL, gpt2_like) == gpt2_like(text)


@given(TEXT, st.sampled_from(segmentation.LAYOUTS))
def test_offsets_point_into_the_utterance(text: str, layout: str) -> None:
    ids, offsets = tokenize_utterance(text, layout, per_char)
    assert len(ids) == len(offsets) == len(text)
    assert all(chr(i) == text[a:b] for i, (a, b) in zip(ids, offsets, strict=True))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("What you know is reverse of the string 'Hello, World!'?", "Hello, World!"),
        ("Calculate the median of the numbers [3, 5, 7, 9, 11].", "[3, 5, 7, 9, 11]"),
        ("Sort [(-1, 2)], please", "-1"),
    ],
)
def test_word_punct_reaches_values_that_fused_punctuation_hides(text: str, value: str) -> None:
    assert not reachable(text, gpt2_like(text)[1], value)
    _, offsets = tokenize_utterance(text, WORD_PUNCT, gpt2_like)
    assert reachable(text, offsets, value)


def test_quoted_greeting_splits_at_every_mark() -> None:
    text = "'Hello, World!'?"
    assert [text[a:b] for a, b in pieces(text, WORD_PUNCT)] == ["'", "Hello", ",", " World", "!", "'", "?"]


@given(TEXT, st.data())
def test_any_run_of_pieces_is_reachable(text: str, data: st.DataObject) -> None:
    cut = pieces(text, WORD_PUNCT)
    _, offsets = tokenize_utterance(text, WORD_PUNCT, gpt2_like)
    if not cut:
        return
    i = data.draw(st.integers(0, len(cut) - 1))
    j = data.draw(st.integers(i, len(cut) - 1))
    value = text[cut[i][0] : cut[j][1]].strip()
    if value:
        assert reachable(text, offsets, value)


def test_unknown_layout_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="utterance_segmentation"):
        pieces("a b", "words")
    assert segmentation.check_layout(WORD_PUNCT) == WORD_PUNCT
    assert segmentation.DEFAULT_LAYOUT == NATURAL


def test_a_tokenizer_that_loses_offsets_is_refused() -> None:
    with pytest.raises(ValueError, match="offsets"):
        tokenize_utterance("a b", NATURAL, lambda text: ([1, 2], [(0, 1)]))
