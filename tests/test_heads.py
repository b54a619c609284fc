"""Head math: the batched implementation equals the recipe's per-slot formulas."""

from __future__ import annotations

import math

import torch

from probeserve.core.bundle import Bundle
from probeserve.core.errors import ProbeError
from probeserve.core.extraction import ExtractionRequest, Extractor
from probeserve.core.heads import HeadDecisions, HeadOutputs, ProbeHeads, decide_groups
from probeserve.core.tokenization import HfPieceTokenizer
from tests.support.tiny_model import TinyArtifacts


def _heads(d: int, seed: int = 0) -> ProbeHeads:
    g = torch.Generator().manual_seed(seed)
    return ProbeHeads(
        null_weight=torch.randn(2, d, generator=g),
        null_bias=torch.randn(2, generator=g),
        start_weight=torch.randn(d, d, generator=g),
        end_weight=torch.randn(d, d, generator=g),
    )


def test_batched_heads_equal_per_slot_formulas() -> None:
    d, t = 16, 30
    heads = _heads(d)
    hidden = torch.randn(t, d, generator=torch.Generator().manual_seed(1))
    queries = torch.tensor([25, 27, 29])
    utt = slice(5, 20)
    out = heads.apply(hidden, queries, utt)
    for i, q in enumerate(queries.tolist()):
        logits = heads.null_weight @ hidden[q] + heads.null_bias
        assert bool(out.present[i]) == (int(logits.argmax()) == 0)
        assert math.isclose(
            float(out.presence_probability[i]), float(torch.softmax(logits, 0)[0]), rel_tol=1e-5
        )
        s = torch.stack([(heads.start_weight @ hidden[q]) @ hidden[j] for j in range(5, 20)]) / math.sqrt(d)
        e = torch.stack([(heads.end_weight @ hidden[q]) @ hidden[j] for j in range(5, 20)]) / math.sqrt(d)
        start = int(s.argmax())
        end = max(int(e.argmax()), start)
        assert int(out.start[i]) == start
        assert int(out.end[i]) == end
        assert math.isclose(float(out.start_probability[i]), float(torch.softmax(s, 0)[start]), rel_tol=1e-4)
        assert math.isclose(float(out.end_probability[i]), float(torch.softmax(e, 0)[end]), rel_tol=1e-4)


def test_end_is_raised_to_start_when_below_it() -> None:
    d = 4
    eye = torch.eye(d)
    # The start pointer prefers token 3, the end pointer token 0.
    heads = ProbeHeads(
        null_weight=torch.zeros(2, d),
        null_bias=torch.tensor([1.0, 0.0]),
        start_weight=eye * 10,
        end_weight=-eye * 10,
    )
    hidden = torch.stack(
        [
            torch.tensor([-1.0, 0, 0, 0]),
            torch.zeros(d),
            torch.zeros(d),
            torch.tensor([1.0, 0, 0, 0]),
            torch.tensor([1.0, 0, 0, 0]),
        ]
    )
    out = heads.apply(hidden, torch.tensor([4]), slice(0, 4))
    assert int(out.start[0]) == 3
    assert int(out.end[0]) == 3


def test_l2_normalised_states_change_presence() -> None:
    """Why the engine must not normalise: the NullHead's bias is tuned to raw state norms."""
    d = 8
    w = torch.zeros(2, d)
    w[0, 0] = 1.0
    heads = ProbeHeads(
        null_weight=w, null_bias=torch.tensor([0.0, 2.0]), start_weight=torch.eye(d), end_weight=torch.eye(d)
    )
    raw = torch.zeros(2, d)
    raw[1, 0] = 5.0  # norm 5: logit_present 5 > logit_absent 2
    unit = torch.nn.functional.normalize(raw, dim=-1)
    assert bool(heads.apply(raw, torch.tensor([1]), slice(0, 1)).present[0]) is True
    assert bool(heads.apply(unit, torch.tensor([1]), slice(0, 1)).present[0]) is False


def _random_prompt(g: torch.Generator, d: int) -> tuple[torch.Tensor, list[int], slice]:
    t = int(torch.randint(12, 40, (1,), generator=g))
    hidden = torch.randn(t, d, generator=g)
    begin = int(torch.randint(1, 4, (1,), generator=g))
    end = int(torch.randint(begin + 1, t - 5, (1,), generator=g))
    slots = int(torch.randint(1, 6, (1,), generator=g))
    queries = sorted(torch.randperm(t - end, generator=g)[:slots].add(end).tolist())
    return hidden, queries, slice(begin, end)


def _decisions(out: HeadOutputs) -> HeadDecisions:
    """``apply``'s outputs as host values, one tensor at a time (the reference for the batch)."""
    return HeadDecisions(
        present=out.present.tolist(),
        presence_probability=out.presence_probability.tolist(),
        start=out.start.tolist(),
        end=out.end.tolist(),
        start_probability=out.start_probability.tolist(),
        end_probability=out.end_probability.tolist(),
    )


def _assert_same(got: HeadDecisions, want: HeadDecisions) -> None:
    """Same decisions; probabilities equal up to float32 summation order (batches are padded)."""
    assert (got.present, got.start, got.end) == (want.present, want.start, want.end)
    for a, b in zip(
        got.presence_probability + got.start_probability + got.end_probability,
        want.presence_probability + want.start_probability + want.end_probability,
        strict=True,
    ):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def test_batched_decisions_equal_one_prompt_at_a_time() -> None:
    """Padding and masking in ``decide_batch`` change nothing: prompts of different lengths,
    slot counts and utterance spans get what ``apply`` gives each alone."""
    d = 32
    heads = _heads(d, seed=3)
    g = torch.Generator().manual_seed(4)
    for batch_size in (1, 2, 5, 8):
        items = [_random_prompt(g, d) for _ in range(batch_size)]
        for (hidden, queries, utt), got in zip(items, heads.decide_batch(items), strict=True):
            _assert_same(got, _decisions(heads.apply(hidden, torch.tensor(queries), utt)))
    assert heads.decide_batch([]) == []


def test_several_bundles_heads_in_one_pass_equal_each_alone() -> None:
    """One step's requests for three bundles (three sets of heads, interleaved, different slot
    counts and lengths) decided in one pass: each gets what its own heads give it alone."""
    d = 32
    bundles = [_heads(d, seed=s) for s in (11, 12, 13)]
    g = torch.Generator().manual_seed(6)
    groups = [
        (heads, [_random_prompt(g, d) for _ in range(n)]) for heads, n in zip(bundles, (3, 1, 4), strict=True)
    ]
    together = decide_groups([*groups, (bundles[0], [])])
    assert [len(x) for x in together] == [3, 1, 4, 0]
    for (heads, items), decided in zip(groups, together[:3], strict=True):
        for (hidden, queries, utt), got in zip(items, decided, strict=True):
            _assert_same(got, _decisions(heads.apply(hidden, torch.tensor(queries), utt)))
    # Only evidence if the bundles disagree on the same states.
    hidden, queries, utt = groups[0][1][0]
    first, second = (_decisions(h.apply(hidden, torch.tensor(queries), utt)) for h in bundles[:2])
    assert (first.present, first.start, first.end) != (second.present, second.start, second.end)


def test_a_request_with_mismatched_states_fails_alone(tiny: TinyArtifacts, tiny_bundle: Bundle) -> None:
    """One step's batch: a prompt whose states do not match its tokens gets its own error, and
    its neighbours get exactly what they get alone."""
    extractor = Extractor(tiny_bundle, HfPieceTokenizer.from_pretrained(tiny.model_dir), _NoEngine())
    g = torch.Generator().manual_seed(5)
    a = extractor.prepare(ExtractionRequest("book_flight", "Paris to Tokyo on March 3rd"))
    b = extractor.prepare(ExtractionRequest("get_weather", "rain in Oslo tomorrow?"))
    d = tiny_bundle.hidden_size
    states_a = torch.randn(len(a.token_ids), d, generator=g)
    states_b = torch.randn(len(b.token_ids), d, generator=g)
    short = torch.randn(len(b.token_ids) - 1, d, generator=g)
    together = extractor.decide_many([(states_a, a), (short, b), (states_b, b)])
    assert isinstance(together[1], ProbeError) and "hidden states for" in together[1].message
    for got, (states, prompt) in ((together[0], (states_a, a)), (together[2], (states_b, b))):
        alone = extractor.decide_many([(states, prompt)])[0]
        assert isinstance(got, HeadDecisions) and isinstance(alone, HeadDecisions)
        _assert_same(got, alone)


class _NoEngine:
    max_prompt_tokens = 512

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        raise AssertionError("not used")
