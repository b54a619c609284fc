"""The demo bundle's values end where the value ends: the real server on the demo model.

SmolLM2's tokenizer fuses punctuation into the neighbouring token (``!'``, ``].``), so a bundle
trained in the ``natural`` layout can only point at the gold value plus that punctuation. The
demo bundle (``word_punct``) returns the value itself. The natural-layout v1 bundle's answers come
from the transformers + peft reference, which the parity tests hold equal to the server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from probeserve.cli import DEMO_BUNDLE, DEMO_MODEL, REPO
from probeserve.core.bundle import load_bundle
from probeserve.launcher import RunningServer, start_server
from probeserve.pairing.reference import ReferenceModel
from probeserve_client import ExtractItem, ProbeClient

NATURAL_BUNDLE = REPO / "bundles" / "xlam-smollm2-135m"

# (function, utterance, slot, the value, what the natural layout returns instead)
CASES = [
    ("reverse_string", "What you know is reverse of the string 'Hello, World!'?", "text",
     "Hello, World!", "Hello, World!'"),
    ("calculate_median", "Calculate the median of the numbers [3, 5, 7, 9, 11].", "numbers",
     "[3, 5, 7, 9, 11]", "[3, 5, 7, 9, 11]."),
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.fail(f"the demo model is missing at {DEMO_MODEL}: `make demo-model` makes it")
    running = start_server(
        bundle=DEMO_BUNDLE,
        model=DEMO_MODEL,
        precision="fp32",
        log_path=tmp_path_factory.mktemp("demo") / "server.log",
        extra_args=("--eager",),  # values, not speed: a fast start
        timeout_s=600,
    )
    yield running
    running.stop()


def test_demo_bundle_is_word_punct() -> None:
    assert load_bundle(DEMO_BUNDLE).utterance_segmentation == "word_punct"
    assert load_bundle(NATURAL_BUNDLE).utterance_segmentation == "natural"


@pytest.mark.parametrize(("function", "utterance", "slot", "value", "natural"), CASES)
def test_values_come_back_without_edge_punctuation(
    demo_server: RunningServer, function: str, utterance: str, slot: str, value: str, natural: str
) -> None:
    with ProbeClient(demo_server.target, timeout=120) as client:
        got = client.extract(function, utterance)
        streamed = list(client.stream([ExtractItem(function, utterance)]))
    assert got.values()[slot] == value
    found = next(s for s in got.slots if s.name == slot)
    assert utterance[found.char_start : found.char_end] == value
    assert streamed[0].extraction is not None and streamed[0].extraction.values() == got.values()


def test_the_natural_layout_keeps_the_fused_punctuation() -> None:
    """What a bundle trained in the recipe's layout loses on the same model and utterances."""
    reference = ReferenceModel(DEMO_MODEL, load_bundle(NATURAL_BUNDLE))
    for function, utterance, slot, _value, natural in CASES:
        answers = {s.name: s.value for s in reference.extract(function, utterance)}
        assert answers[slot] == natural
