"""The extraction pipeline: validate, build the prompt, run the engine, apply the heads, decode spans.

This module knows neither gRPC nor vLLM: the engine is anything with ``hidden_states``.
"""

from __future__ import annotations

import difflib
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import torch

from probeserve.bundle import Bundle
from probeserve.errors import ErrorKind, InvalidRequestError, ProbeError
from probeserve.prompt import PieceTokenizer, Prompt, PromptBuilder
from probeserve.spans import decode_span


class HiddenStateEngine(Protocol):
    """What the pipeline needs from an inference engine."""

    @property
    def max_prompt_tokens(self) -> int: ...

    async def hidden_states(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        """The final-layer hidden states [T, d] of the prompt, with the bundle's adapter applied."""
        ...


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
    """Runs the pipeline for one loaded bundle over one engine."""

    def __init__(self, bundle: Bundle, tokenizer: PieceTokenizer, engine: HiddenStateEngine) -> None:
        self.bundle = bundle
        self.engine = engine
        self.prompts = PromptBuilder(tokenizer, bundle.functions)

    def prepare(self, request: ExtractionRequest) -> Prompt:
        """Validate a request and build its prompt; raises :class:`InvalidRequestError`."""
        if request.bundle and request.bundle != self.bundle.name:
            raise ProbeError(
                f"bundle {request.bundle!r} is not loaded; this server serves {self.bundle.name!r}",
                ErrorKind.NOT_FOUND,
            )
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
        hidden = await self.engine.hidden_states(request_id, prompt.token_ids)
        t2 = time.perf_counter()
        slots = self.read_slots(prompt, request.utterance, hidden)
        t3 = time.perf_counter()
        timings = Timings(
            prepare_ms=(t1 - t0) * 1e3,
            engine_ms=(t2 - t1) * 1e3,
            heads_ms=(t3 - t2) * 1e3,
            total_ms=(t3 - t0) * 1e3,
        )
        return Extraction(request_id, slots, len(prompt.token_ids), timings)

    def read_slots(self, prompt: Prompt, utterance: str, hidden: torch.Tensor) -> tuple[SlotResult, ...]:
        """Apply the heads to a prompt's hidden states and decode each present slot's span."""
        if hidden.shape[0] != len(prompt.token_ids):
            raise ProbeError(
                f"engine returned {hidden.shape[0]} hidden states for {len(prompt.token_ids)} tokens"
            )
        out = self.bundle.heads.apply(
            hidden,
            torch.tensor(prompt.query_positions, dtype=torch.long),
            slice(prompt.utterance_start, prompt.utterance_end),
        )
        present = out.present.tolist()
        presence = out.presence_probability.tolist()
        starts, ends = out.start.tolist(), out.end.tolist()
        start_p, end_p = out.start_probability.tolist(), out.end_probability.tolist()
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
