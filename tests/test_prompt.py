"""Prompt layout: the exact token sequence the heads were trained on."""

from __future__ import annotations

from probeserve.core.bundle import Bundle
from probeserve.core.prompt import PromptBuilder
from probeserve.core.tokenization import HfPieceTokenizer
from tests.support.tiny_model import TinyArtifacts


def test_prompt_is_concatenation_of_separately_tokenized_pieces(
    tiny: TinyArtifacts, tiny_bundle: Bundle
) -> None:
    tok = HfPieceTokenizer.from_pretrained(tiny.model_dir)
    utterance = "Book a flight from Paris to Tokyo on March 3rd"
    prompt = PromptBuilder.for_bundle(tok, tiny_bundle).build("book_flight", utterance)

    expected: list[int] = tok.encode("Function: book_flight\n")
    u0 = len(expected)
    expected += tok.encode(utterance)
    u1 = len(expected)
    expected += tok.encode("\n\n")
    queries = []
    for slot in ["date", "destination", "origin", "passengers"]:  # sorted by name
        expected += tok.encode(f"{slot}:")
        queries.append(len(expected) - 1)
        expected += tok.encode("\n")

    assert prompt.token_ids == expected
    assert prompt.slot_names == ("date", "destination", "origin", "passengers")
    assert prompt.query_positions == queries
    assert (prompt.utterance_start, prompt.utterance_end) == (u0, u1)
    assert len(prompt.utterance_offsets) == u1 - u0
    # No special tokens anywhere: the recipe tokenized with add_special_tokens=False.
    assert tok.tokenizer.bos_token_id not in prompt.token_ids


def test_query_position_is_last_token_of_slot_marker(tiny: TinyArtifacts, tiny_bundle: Bundle) -> None:
    tok = HfPieceTokenizer.from_pretrained(tiny.model_dir)
    prompt = PromptBuilder.for_bundle(tok, tiny_bundle).build("get_weather", "rain in Oslo?")
    for slot, q in zip(prompt.slot_names, prompt.query_positions, strict=True):
        marker = tok.encode(f"{slot}:")
        assert prompt.token_ids[q - len(marker) + 1 : q + 1] == marker
        assert prompt.token_ids[q + 1 : q + 1 + len(tok.encode("\n"))] == tok.encode("\n")


def test_offsets_come_from_the_rust_tokenizer_as_transformers_gives_them(tiny: TinyArtifacts) -> None:
    """``encode_with_offsets`` calls the Rust tokenizer directly; it must give what the
    transformers call (what the recipe and the reference use) gives, ids and offsets alike."""
    tok = HfPieceTokenizer.from_pretrained(tiny.model_dir)
    for text in [
        "Book a flight from Paris to Tokyo on March 3rd",
        "  leading and trailing spaces  ",
        "Ünïcödé façade naïve café — résumé, 東京, Москва, 🙂 emoji.",
        "tabs\tand\nnewlines\r\n",
        "x",
    ]:
        ids, offsets = tok.encode_with_offsets(text)
        enc = tok.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == enc["input_ids"]
        assert offsets == [tuple(o) for o in enc["offset_mapping"]]
        assert ids == tok.encode(text)


def test_word_punct_prompt_tokenizes_the_utterance_piece_by_piece(
    tiny: TinyArtifacts, tiny_bundle: Bundle
) -> None:
    """The word_punct layout: the utterance cut at word/punctuation boundaries, each piece tokenized
    alone; every other part of the prompt as in the natural layout, and offsets in the utterance."""
    tok = HfPieceTokenizer.from_pretrained(tiny.model_dir)
    utterance = "What's 'Hello, World!'?"
    natural = PromptBuilder.for_bundle(tok, tiny_bundle).build("get_weather", utterance)
    word_punct = PromptBuilder(tok, tiny_bundle.functions, "word_punct").build("get_weather", utterance)

    pieces = ["What", "'", "s", " '", "Hello", ",", " World", "!", "'", "?"]
    expected = [i for piece in pieces for i in tok.encode(piece)]
    ids = word_punct.token_ids[word_punct.utterance_start : word_punct.utterance_end]
    assert ids == expected
    # The tiny tokenizer learned "'s" as one token (its corpus has "What's"): natural fuses it.
    assert ids != natural.token_ids[natural.utterance_start : natural.utterance_end]
    head, tail = natural.utterance_start, len(natural.token_ids) - natural.utterance_end
    assert word_punct.token_ids[:head] == natural.token_ids[:head]
    assert word_punct.token_ids[len(word_punct.token_ids) - tail :] == natural.token_ids[-tail:]
    # Offsets point into the utterance, and the value without its quotes is a whole-token span.
    starts = {a for a, _ in word_punct.utterance_offsets}
    ends = {b for _, b in word_punct.utterance_offsets}
    begin = utterance.index("Hello")
    assert begin in starts and begin + len("Hello, World!") in ends


def test_word_punct_pieces_are_tokenized_once_and_prompts_stay_the_same(
    tiny: TinyArtifacts, tiny_bundle: Bundle
) -> None:
    """Repeated pieces come from the builder's cache: the tokenizer sees each distinct piece once,
    and a prompt built from cached pieces equals the one built before (offsets shifted anew)."""
    tok = HfPieceTokenizer.from_pretrained(tiny.model_dir)
    seen: list[str] = []

    class Counting:
        def encode(self, text: str) -> list[int]:
            return tok.encode(text)

        def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
            seen.append(text)
            return tok.encode_with_offsets(text)

    builder = PromptBuilder(Counting(), tiny_bundle.functions, "word_punct")
    first = builder.build("get_weather", "rain in Oslo, then rain in Bergen?")
    second = builder.build("get_weather", "rain in Oslo, then rain in Bergen?")
    other = builder.build("get_weather", "in Bergen, rain")
    assert second == first
    assert sorted(seen) == sorted({" rain", "rain", " in", " Oslo", ",", " then", " Bergen", "?", "in"})
    fresh = PromptBuilder(tok, tiny_bundle.functions, "word_punct")
    assert other == fresh.build("get_weather", "in Bergen, rain")
