"""The extraction pipeline: validate, build the prompt, run the engine, apply the heads, decode spans.

This module knows neither gRPC nor vLLM: the engine is anything with ``hidden_states``.
"""

from __future__ import annotations

import difflib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast, runtime_checkable

import torch

from probeserve.core.bundle import Bundle
from probeserve.core.errors import InvalidRequestError, ProbeError
from probeserve.core.heads import HeadDecisions, HeadItem, decide_groups
from probeserve.core.prompt import PieceTokenizer, Prompt, PromptBuilder
from probeserve.core.spans import decode_span


class HiddenStateEngine(Protocol):
    """What the pipeline needs from an inference engine."""

    @property
    def max_prompt_tokens(self) -> int: ...

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        """The final-layer hidden states [T, d] of the prompt, with the bundle's adapter applied."""
        ...


C = TypeVar("C")
R = TypeVar("R")
# Reads the hidden states of several requests at once: (states [T, d], the caller's context) in,
# one result per item out; an item's result may be an exception, raised to that caller alone.
BatchReader = Callable[[Sequence[tuple[torch.Tensor, C]]], Sequence[R | BaseException]]


@runtime_checkable
class ReadsInPlace(Protocol):
    """An engine that applies a reader to the hidden states where it makes them.

    The inline engine hands the reader every request that one step finished, on its own thread
    and with the states still beside the GPU: the probe heads then run once per step for the
    whole batch, and the event loop gets back a few numbers per request instead of a [T, d]
    tensor to process.
    """

    async def read_states(
        self, request_id: str, token_ids: list[int], reader: BatchReader[C, R], context: C
    ) -> R:
        """This request's item of ``reader(...)``; the reader's exceptions reach the caller."""
        ...


@dataclass(frozen=True)
class _Read:
    decisions: HeadDecisions
    started: float  # perf_counter() when the heads began
    ended: float


@dataclass(frozen=True)
class ExtractionRequest:
    """One utterance to answer; ``request_id`` may be empty (one is assigned)."""

    function: str
    utterance: str
    request_id: str = ""
    bundle: str = ""


@dataclass(frozen=True)
class SlotResult:
    """The heads' answer for one slot; span fields are set only when the slot is present."""

    name: str
    present: bool
    presence_probability: float
    value: str | None = None
    char_start: int | None = None
    char_end: int | None = None
    token_start: int | None = None
    token_end: int | None = None
    start_probability: float | None = None
    end_probability: float | None = None


@dataclass
class Timings:
    """Milliseconds spent in each stage of one request."""

    prepare_ms: float = 0.0
    engine_ms: float = 0.0
    heads_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Extraction:
    """The answer to one request: one result per schema slot, in sorted slot order."""

    request_id: str
    slots: tuple[SlotResult, ...]
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings, compare=False)


def new_request_id() -> str:
    return uuid.uuid4().hex


class Extractor:
    """Runs the pipeline for one loaded bundle over one engine (seen through the bundle's adapter).

    Which bundle answers a request is the registry's business (``probeserve.core.registry``):
    an extractor answers every request it is given with its own bundle.
    """

    def __init__(self, bundle: Bundle, tokenizer: PieceTokenizer, engine: HiddenStateEngine) -> None:
        self.bundle = bundle
        self.engine = engine
        self.prompts = PromptBuilder.for_bundle(tokenizer, bundle)
        # A runtime protocol check costs tens of microseconds: once, not per request.
        self._reads_in_place = isinstance(engine, ReadsInPlace)

    def prepare(self, request: ExtractionRequest) -> Prompt:
        """Validate a request and build its prompt; raises :class:`InvalidRequestError`."""
        if not request.function:
            raise InvalidRequestError("function is required")
        if request.function not in self.bundle.functions:
            close = difflib.get_close_matches(request.function, list(self.bundle.functions), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InvalidRequestError(
                f"unknown function {request.function!r} for bundle {self.bundle.name!r} "
                f"({len(self.bundle.functions)} functions, listed by GetInfo){hint}"
            )
        if not request.utterance.strip():
            raise InvalidRequestError("utterance is empty")
        prompt = self.prompts.build(request.function, request.utterance)
        if prompt.utterance_tokens == 0:
            raise InvalidRequestError("utterance has no tokens")
        limit = self.engine.max_prompt_tokens
        if len(prompt.token_ids) > limit:
            raise InvalidRequestError(
                f"prompt is {len(prompt.token_ids)} tokens (utterance {prompt.utterance_tokens}); "
                f"the model accepts at most {limit}"
            )
        return prompt

    async def extract(self, request: ExtractionRequest) -> Extraction:
        """Answer one request; raises :class:`ProbeError` with a kind for the transport."""
        t0 = time.perf_counter()
        request_id = request.request_id or new_request_id()
        prompt = self.prepare(request)
        t1 = time.perf_counter()
        if self._reads_in_place:
            engine = cast(ReadsInPlace, self.engine)  # checked once, in __init__
            # One reader for every bundle: the engine calls it once per step with all of them.
            done: _Read = await engine.read_states(request_id, prompt.token_ids, read_heads, (self, prompt))
        else:
            hidden = await self.engine.hidden_states(request_id, prompt.token_ids)
            read = read_heads([(hidden, (self, prompt))])[0]
            if isinstance(read, BaseException):
                raise read
            done = read
        slots = self.slot_results(prompt, request.utterance, done.decisions)
        t3 = time.perf_counter()
        timings = Timings(
            prepare_ms=(t1 - t0) * 1e3,
            engine_ms=(done.started - t1) * 1e3,
            heads_ms=(done.ended - done.started) * 1e3,  # spans and hand-offs count in total only
            total_ms=(t3 - t0) * 1e3,
        )
        return Extraction(request_id, slots, len(prompt.token_ids), timings)

    def read_slots(self, prompt: Prompt, utterance: str, hidden: torch.Tensor) -> tuple[SlotResult, ...]:
        """Apply the heads to a prompt's hidden states and decode each present slot's span."""
        decided = self.decide_many([(hidden, prompt)])[0]
        if isinstance(decided, BaseException):
            raise decided
        return self.slot_results(prompt, utterance, decided)

    def decide_many(self, items: Sequence[tuple[torch.Tensor, Prompt]]) -> list[HeadDecisions | ProbeError]:
        """The heads' decisions for several prompts' hidden states in one batched pass.

        Thread-safe (the inline engine calls it on its own thread). A prompt whose states do not
        match its tokens gets a :class:`ProbeError` in its place; the others are still answered.
        """
        return decide_together([(self, hidden, prompt) for hidden, prompt in items])

    def slot_results(self, prompt: Prompt, utterance: str, decided: HeadDecisions) -> tuple[SlotResult, ...]:
        """Each slot's answer: absent, or the span its pointers cut from the utterance."""
        present, presence = decided.present, decided.presence_probability
        starts, ends = decided.start, decided.end
        start_p, end_p = decided.start_probability, decided.end_probability
        results = []
        for i, name in enumerate(prompt.slot_names):
            if not present[i]:
                results.append(SlotResult(name, False, presence[i]))
                continue
            span = decode_span(utterance, prompt.utterance_offsets, starts[i], ends[i])
            results.append(
                SlotResult(
                    name=name,
                    present=True,
                    presence_probability=presence[i],
                    value=span.value,
                    char_start=span.char_start,
                    char_end=span.char_end,
                    token_start=starts[i],
                    token_end=ends[i],
                    start_probability=start_p[i],
                    end_probability=end_p[i],
                )
            )
        return tuple(results)


def decide_together(
    entries: Sequence[tuple[Extractor, torch.Tensor, Prompt]],
) -> list[HeadDecisions | ProbeError]:
    """The decisions for prompts of any bundles, all bundles' heads in one pass (decide_groups).

    A prompt whose states do not match its tokens gets a :class:`ProbeError` in its place.
    """
    out: list[HeadDecisions | ProbeError | None] = [None] * len(entries)
    groups: dict[Extractor, list[int]] = {}
    for i, (extractor, hidden, prompt) in enumerate(entries):
        if hidden.shape[0] != len(prompt.token_ids):
            out[i] = ProbeError(
                f"engine returned {hidden.shape[0]} hidden states for {len(prompt.token_ids)} tokens"
            )
        else:
            groups.setdefault(extractor, []).append(i)
    decided = decide_groups(
        [
            (extractor.bundle.heads, [_head_item(*entries[i][1:]) for i in indices])
            for extractor, indices in groups.items()
        ]
    )
    for indices, decisions in zip(groups.values(), decided, strict=True):
        for i, decision in zip(indices, decisions, strict=True):
            out[i] = decision
    return [d for d in out if d is not None]


def _head_item(hidden: torch.Tensor, prompt: Prompt) -> HeadItem:
    return hidden, prompt.query_positions, slice(prompt.utterance_start, prompt.utterance_end)


def read_heads(items: Sequence[tuple[torch.Tensor, tuple[Extractor, Prompt]]]) -> list[_Read | ProbeError]:
    """The engine's reader for every bundle: :func:`decide_together`, timed (the heads' time is
    the step's)."""
    started = time.perf_counter()
    decided = decide_together([(extractor, hidden, prompt) for hidden, (extractor, prompt) in items])
    ended = time.perf_counter()
    return [d if isinstance(d, ProbeError) else _Read(d, started, ended) for d in decided]
