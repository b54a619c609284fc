"""The probe heads' math: NullHead (presence) and PointerHead (span start/end), for all slots at once.

For query states ``Q = H[q]`` ([S, d]) and utterance states ``U`` ([N, d]):

- presence logits ``Q @ Wn.T + bn`` ([S, 2], index 0 = present); present iff argmax == 0;
- start scores ``(Q @ Ws.T) @ U.T / sqrt(d)`` ([S, N]), end scores likewise with ``We``;
- start = argmax of start scores, end = argmax of end scores, then raised to start if below it.

Hidden states must be the raw final-norm outputs: L2-normalising them changes the NullHead's
decision (its bias no longer balances the logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probeserve.core.errors import BundleError


@dataclass(frozen=True)
class HeadOutputs:
    """Per-slot head decisions; token indices count utterance tokens from 0."""

    present: torch.Tensor  # [S] bool
    presence_probability: torch.Tensor  # [S] float
    start: torch.Tensor  # [S] long
    end: torch.Tensor  # [S] long, >= start
    start_probability: torch.Tensor  # [S] float
    end_probability: torch.Tensor  # [S] float
    # The raw scores the decisions come from (the pairing check compares them to references).
    null_logits: torch.Tensor  # [S, 2]
    start_scores: torch.Tensor  # [S, N]
    end_scores: torch.Tensor  # [S, N]


@dataclass(frozen=True)
class HeadDecisions:
    """:class:`HeadOutputs`' decisions as Python values on the host, one list entry per slot."""

    present: list[bool]
    presence_probability: list[float]
    start: list[int]
    end: list[int]
    start_probability: list[float]
    end_probability: list[float]


@dataclass(frozen=True)
class ProbeHeads:
    """The NullHead and PointerHead weights (float32)."""

    null_weight: torch.Tensor  # [2, d]
    null_bias: torch.Tensor  # [2]
    start_weight: torch.Tensor  # [d, d]
    end_weight: torch.Tensor  # [d, d]
    # Both pointer matrices in one [2d, d] tensor (start_weight and end_weight are views of it), so
    # the batched path projects the queries for both pointers in one matmul.
    _pointer: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        d = self.null_weight.shape[-1]
        expected = {
            "null_head.classifier.weight": (self.null_weight, (2, d)),
            "null_head.classifier.bias": (self.null_bias, (2,)),
            "pointer_head.W_start.weight": (self.start_weight, (d, d)),
            "pointer_head.W_end.weight": (self.end_weight, (d, d)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise BundleError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        pointer = torch.cat((self.start_weight, self.end_weight))
        object.__setattr__(self, "_pointer", pointer)
        object.__setattr__(self, "start_weight", pointer[:d])
        object.__setattr__(self, "end_weight", pointer[d:])

    @property
    def hidden_size(self) -> int:
        return int(self.null_weight.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.null_weight.device

    def to(self, device: str | torch.device) -> ProbeHeads:
        """The heads on another device: on a GPU, an 8B model's [d, d] pointer matrices cost
        ~12 ms per request on one CPU thread and well under 1 ms on the GPU."""
        return ProbeHeads(
            null_weight=self.null_weight.to(device),
            null_bias=self.null_bias.to(device),
            start_weight=self.start_weight.to(device),
            end_weight=self.end_weight.to(device),
        )

    def apply(self, hidden: torch.Tensor, query_positions: torch.Tensor, utterance: slice) -> HeadOutputs:
        """Run both heads for every query position in one batched matmul each.

        ``hidden`` is [T, d]; ``query_positions`` [S] indexes it; ``utterance`` selects the
        utterance tokens, the only positions a pointer may choose.
        """
        hidden = hidden.to(self.device, torch.float32)
        queries = hidden.index_select(0, query_positions.to(self.device))  # [S, d]
        candidates = hidden[utterance]  # [N, d]
        if candidates.shape[0] == 0:
            raise ValueError("the utterance has no tokens")

        null_logits = queries @ self.null_weight.T + self.null_bias  # [S, 2]
        presence = torch.softmax(null_logits, dim=-1)[:, 0]
        # Both pointers in one matmul: [2S, d] @ [d, N].
        scale = 1.0 / math.sqrt(self.hidden_size)
        projected = torch.cat((queries @ self.start_weight.T, queries @ self.end_weight.T))
        scores = (projected @ candidates.T) * scale
        n = queries.shape[0]
        start_scores, end_scores = scores[:n], scores[n:]

        start = start_scores.argmax(dim=-1)
        end = torch.maximum(end_scores.argmax(dim=-1), start)
        start_prob = torch.softmax(start_scores, dim=-1).gather(1, start[:, None])[:, 0]
        end_prob = torch.softmax(end_scores, dim=-1).gather(1, end[:, None])[:, 0]
        return HeadOutputs(
            present=null_logits.argmax(dim=-1) == 0,
            presence_probability=presence,
            start=start,
            end=end,
            start_probability=start_prob,
            end_probability=end_prob,
            null_logits=null_logits,
            start_scores=start_scores,
            end_scores=end_scores,
        )

    def decide_batch(self, items: Sequence[HeadItem]) -> list[HeadDecisions]:
        """:meth:`apply` for several prompts in one pass, brought to the host in one copy
        (:func:`decide_groups` with these heads alone)."""
        return decide_groups([(self, items)])[0]


# One prompt for the batched path: (hidden [T, d], query positions, utterance slice).
HeadItem = tuple[torch.Tensor, Sequence[int], slice]


def decide_groups(groups: Sequence[tuple[ProbeHeads, Sequence[HeadItem]]]) -> list[list[HeadDecisions]]:
    """:meth:`ProbeHeads.apply` for the prompts of several bundles' heads in one pass.

    The prompts are padded to the longest query and utterance lists (padded candidates masked),
    so a batch costs about the same ~18 tensor operations as one prompt, plus two per extra set
    of heads (each bundle's own NullHead and pointer projections); everything after the
    projections, and the one copy to the host, is shared. On a GPU that per-operation launch
    overhead, not the arithmetic, is the cost, so the path is written for few operations: a
    step that answers requests of eight bundles pays it once, not eight times. Decisions equal
    :meth:`ProbeHeads.apply`'s; probabilities may differ in the last float32 digits with the
    batch's padding (summation order), as the engine's own states do with its batch. All heads
    must live on one device and have one width.
    """
    live = [(heads, items) for heads, items in groups if items]
    if not live:
        return [[] for _ in groups]
    device, d = live[0][0].device, live[0][0].hidden_size
    if any(heads.device != device or heads.hidden_size != d for heads, _ in live):
        raise ValueError("heads decided together must share one device and width")
    all_items = [item for _, items in live for item in items]
    b = len(all_items)
    queries: list[list[int]] = []
    spans: list[tuple[int, int]] = []  # (first utterance row, utterance tokens)
    row = 0
    for hidden, positions, utterance in all_items:
        first, stop, _ = utterance.indices(hidden.shape[0])
        if stop <= first:
            raise ValueError("the utterance has no tokens")
        queries.append([row + int(p) for p in positions])
        spans.append((row + first, stop - first))
        row += hidden.shape[0]
    s_max = max(len(q) for q in queries)
    n_max = max(n for _, n in spans)
    # The query rows, then the candidate rows, then the utterance lengths: one copy to the
    # device. Padding points at row 0; padded queries are dropped when unpacking.
    index = [r for q in queries for r in q + [0] * (s_max - len(q))]
    index += [start + j if j < n else 0 for start, n in spans for j in range(n_max)]
    lengths = [n for _, n in spans]
    # From pinned memory the copy is queued like any kernel; from pageable memory CUDA would
    # first wait for everything already queued on the stream.
    host = torch.tensor(index + lengths, dtype=torch.long, pin_memory=device.type == "cuda")
    on_device = host.to(device, non_blocking=True)
    states = [hidden.to(device, torch.float32, non_blocking=True) for hidden, _, _ in all_items]
    flat = states[0] if b == 1 else torch.cat(states)
    rows = flat[on_device[: len(index)]]
    q = rows[: b * s_max].view(b, s_max, d)
    c = rows[b * s_max :].view(b, n_max, d)

    # Each set of heads projects its own prompts' queries: [B_k, S, 2] and [B_k, S, 2d].
    null_parts, pointer_parts, at = [], [], 0
    for heads, items in live:
        group_queries = q[at : at + len(items)]
        null_parts.append(torch.nn.functional.linear(group_queries, heads.null_weight, heads.null_bias))
        pointer_parts.append(torch.nn.functional.linear(group_queries, heads._pointer))
        at += len(items)
    null_logits = null_parts[0] if len(live) == 1 else torch.cat(null_parts)  # [B, S, 2]
    # [B, S, 2d] -> [B, 2S, d]: each slot's start projection, then its end projection.
    projected = (pointer_parts[0] if len(live) == 1 else torch.cat(pointer_parts)).view(b, 2 * s_max, d)
    scores = torch.bmm(projected, c.transpose(1, 2)).view(b, s_max, 2, n_max)
    scores.mul_(1.0 / math.sqrt(d))
    if min(lengths) < n_max:
        padded = torch.arange(n_max, device=device) >= on_device[len(index) :, None]  # [B, N]
        scores.masked_fill_(padded[:, None, None, :], float("-inf"))
    pointers = scores.argmax(dim=-1)  # [B, S, 2]: start, end
    pointers[..., 1].clamp_(min=pointers[..., 0])  # the end is raised to the start
    probabilities = torch.softmax(scores, dim=-1).gather(-1, pointers[..., None])[..., 0]  # [B, S, 2]
    presence = torch.softmax(null_logits, dim=-1)[..., :1]
    packed = torch.cat((null_logits, presence, pointers.to(torch.float32), probabilities), dim=-1).cpu()
    decided = []
    for i, slots in enumerate(packed.tolist()):  # [S, 7] per prompt; the one wait for the device
        mine = slots[: len(queries[i])]
        decided.append(
            HeadDecisions(
                # argmax == 0, ties included (argmax returns the first maximum)
                present=[absent <= present for present, absent, *_ in mine],
                presence_probability=[r[2] for r in mine],
                start=[int(r[3]) for r in mine],
                end=[int(r[4]) for r in mine],
                start_probability=[r[5] for r in mine],
                end_probability=[r[6] for r in mine],
            )
        )
    out: list[list[HeadDecisions]] = []
    at = 0
    for _, items in groups:
        out.append(decided[at : at + len(items)])
        at += len(items)
    return out
