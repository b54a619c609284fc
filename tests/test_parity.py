"""Parity: the real server (vLLM engine, gRPC, client) answers exactly as the reference computation.

The reference is the recipe's formulas in plain transformers+peft (probeserve.pairing.reference), with
its own prompt assembly and per-slot head math. Both run in float32.
"""

from __future__ import annotations

import pytest

from probeserve.core.bundle import Bundle
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
]


@pytest.fixture(scope="module")
def reference(tiny: TinyArtifacts, tiny_bundle: Bundle) -> ReferenceModel:
    return ReferenceModel(tiny.model_dir, tiny_bundle)


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
