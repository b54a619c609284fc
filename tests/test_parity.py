"""Parity: the real server (vLLM engine, gRPC, client) answers exactly as the reference computation.

The reference is the recipe's formulas in plain transformers+peft (probeserve.pairing.reference), with
its own prompt assembly and per-slot head math. Both run in float32. Every parity test runs for
both utterance layouts: the session server's bundle has no ``utterance_segmentation`` field (the
public recipe's ``natural`` layout), a second server serves the same adapter and heads declared
``word_punct``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from probeserve.core.bundle import load_bundle
from probeserve.launcher import RunningServer
from probeserve.pairing.reference import ReferenceModel
from probeserve_client import Extraction, ExtractItem, ProbeClient
from tests.support.tiny_model import TinyArtifacts

CASES = [
    ("book_flight", "Book a flight from Paris to Tokyo on March 3rd for two adults."),
    ("book_flight", "I need to get from Oslo to Rome, 2 people, next Friday"),
    ("book_flight", "fly me to the moon"),
    ("book_flight", "Von München nach Zürich am 3. Mai, bitte — für 1 Person 🙂"),
    ("get_weather", "What's the weather in Berlin tomorrow, in celsius please?"),
    ("get_weather", "Is it raining in 東京?"),
    ("get_weather", "temperature fahrenheit Chicago"),
    ("get_weather", "x"),
    # Punctuation that byte-level BPE fuses into a word's token: the layouts tokenize these apart.
    ("get_weather", "What you know is reverse of the string 'Hello, World!'?"),
    ("book_flight", "Calculate the median of the numbers [3, 5, 7, 9, 11]."),
    ("book_flight", "It's Maria's flight: Paris to Tokyo, what's the date?"),
]


@dataclass(frozen=True)
class Served:
    layout: str
    client: ProbeClient
    reference: ReferenceModel


_REFERENCES: dict[str, ReferenceModel] = {}


@pytest.fixture(scope="module", params=["natural", "word_punct"])
def served(request: pytest.FixtureRequest, tiny: TinyArtifacts) -> Iterator[Served]:
    layout = str(request.param)
    if layout == "natural":
        server: RunningServer = request.getfixturevalue("server")
        bundle_dir = tiny.bundle_dir
    else:
        server = request.getfixturevalue("word_punct_server")
        bundle_dir = request.getfixturevalue("word_punct_bundle_dir")
    bundle = load_bundle(bundle_dir)
    assert bundle.utterance_segmentation == layout
    if layout not in _REFERENCES:
        _REFERENCES[layout] = ReferenceModel(tiny.model_dir, bundle)
    with ProbeClient(server.target, timeout=60) as client:
        yield Served(layout, client, _REFERENCES[layout])


@pytest.fixture
def client(served: Served) -> ProbeClient:
    return served.client


@pytest.fixture
def reference(served: Served) -> ReferenceModel:
    return served.reference


def _assert_matches_reference(
    got: Extraction, reference: ReferenceModel, function: str, utterance: str
) -> None:
    want = reference.extract(function, utterance)
    assert [s.name for s in got.slots] == [w.name for w in want]
    for slot, ref in zip(got.slots, want, strict=True):
        where = (
            f"{function}/{slot.name} on {utterance!r} (reference margins: "
            f"presence {ref.presence_margin:.2e}, start {ref.start_margin:.2e}, end {ref.end_margin:.2e})"
        )
        assert slot.present == ref.present, where
        assert slot.presence_probability == pytest.approx(ref.presence_probability, abs=1e-4), where
        if ref.present:
            assert (slot.token_start, slot.token_end) == (ref.token_start, ref.token_end), where
            assert slot.value == ref.value, where
            assert utterance[slot.char_start : slot.char_end] == slot.value, where
            assert slot.start_probability == pytest.approx(ref.start_probability, abs=1e-4), where
            assert slot.end_probability == pytest.approx(ref.end_probability, abs=1e-4), where
        else:
            assert slot.value is None and slot.token_start is None and slot.char_start is None, where


@pytest.mark.parametrize(("function", "utterance"), CASES)
def test_unary_matches_reference(
    client: ProbeClient, reference: ReferenceModel, function: str, utterance: str
) -> None:
    _assert_matches_reference(client.extract(function, utterance), reference, function, utterance)


def test_cases_exercise_both_decisions(client: ProbeClient) -> None:
    """The parity cases are only evidence if they contain present and absent slots alike."""
    presence = [s.present for f, u in CASES for s in client.extract(f, u).slots]
    assert any(presence) and not all(presence)


def test_lora_is_applied(client: ProbeClient, reference: ReferenceModel) -> None:
    """The server's states must be the adapted model's: without the adapter the answers differ."""
    function, utterance = CASES[0]
    served = client.extract(function, utterance)
    with reference.model.disable_adapter():
        unadapted = reference.extract(function, utterance)
    assert [s.presence_probability for s in served.slots] != pytest.approx(
        [u.presence_probability for u in unadapted], abs=1e-3
    )


def test_batch_and_stream_equal_unary(client: ProbeClient) -> None:
    items = [ExtractItem(f, u, request_id=f"item-{i}") for i, (f, u) in enumerate(CASES)]
    unary = [client.extract(i.function, i.utterance, request_id=i.request_id) for i in items]
    batch = client.extract_batch(items)
    stream = list(client.stream(items))
    assert [r.request_id for r in batch] == [i.request_id for i in items]
    assert [r.request_id for r in stream] == [i.request_id for i in items]
    for u, b, s in zip(unary, batch, stream, strict=True):
        assert b.extraction is not None and s.extraction is not None
        assert [x.present for x in b.extraction.slots] == [x.present for x in u.slots]
        assert b.extraction.values() == u.values() == s.extraction.values()
        for got in (b.extraction, s.extraction):
            for x, y in zip(got.slots, u.slots, strict=True):
                assert (x.token_start, x.token_end) == (y.token_start, y.token_end)
                assert x.presence_probability == pytest.approx(y.presence_probability, abs=1e-4)


def test_layouts_tokenize_fused_punctuation_apart(tiny: TinyArtifacts, word_punct_bundle_dir: Path) -> None:
    """The word_punct parity runs are evidence only if some of its prompts differ from natural ones.

    The tiny tokenizer learned few merges across punctuation ("'s" is one); the demo model's
    fuses far more (tests/test_demo_values.py)."""
    from probeserve.core.prompt import PromptBuilder
    from probeserve.core.tokenization import HfPieceTokenizer

    tokenizer = HfPieceTokenizer.from_pretrained(tiny.model_dir)
    natural = PromptBuilder.for_bundle(tokenizer, load_bundle(tiny.bundle_dir))
    word_punct = PromptBuilder.for_bundle(tokenizer, load_bundle(word_punct_bundle_dir))
    differing = [
        (f, u) for f, u in CASES if natural.build(f, u).token_ids != word_punct.build(f, u).token_ids
    ]
    assert ("get_weather", "What's the weather in Berlin tomorrow, in celsius please?") in differing
    assert ("book_flight", "It's Maria's flight: Paris to Tokyo, what's the date?") in differing
