"""Span decoding cuts values from the utterance by character offsets, never re-decodes tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probeserve.core.spans import decode_span
from probeserve.core.tokenization import HfPieceTokenizer
from tests.support.tiny_model import TinyArtifacts


def test_value_is_exact_substring_with_surrounding_space_trimmed() -> None:
    utterance = "fly to New York tomorrow"
    offsets = [(0, 3), (3, 6), (6, 10), (10, 15), (15, 24)]  # byte-level style: leading spaces
    span = decode_span(utterance, offsets, 2, 3)
    assert span.value == "New York"
    assert utterance[span.char_start : span.char_end] == span.value


def test_whitespace_only_span_keeps_raw_offsets() -> None:
    span = decode_span("a  b", [(0, 1), (1, 3), (3, 4)], 1, 1)
    assert (span.char_start, span.char_end, span.value) == (1, 3, "  ")


def test_out_of_range_tokens_are_rejected() -> None:
    with pytest.raises(ValueError):
        decode_span("ab", [(0, 2)], 0, 1)


@pytest.fixture(scope="module")
def tokenizer(tiny: TinyArtifacts) -> HfPieceTokenizer:
    return HfPieceTokenizer.from_pretrained(tiny.model_dir)


# No deadline: the claim is about spans, and a loaded CI machine can take longer than 200 ms.
@settings(deadline=None)
@given(text=st.text(min_size=1, max_size=40), data=st.data())
def test_any_span_of_any_text_is_a_substring(
    tokenizer: HfPieceTokenizer, text: str, data: st.DataObject
) -> None:
    ids, offsets = tokenizer.encode_with_offsets(text)
    if not ids:
        return
    start = data.draw(st.integers(0, len(ids) - 1))
    end = data.draw(st.integers(start, len(ids) - 1))
    span = decode_span(text, offsets, start, end)
    assert text[span.char_start : span.char_end] == span.value
    assert 0 <= span.char_start <= span.char_end <= len(text)
