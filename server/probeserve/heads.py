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
from dataclasses import dataclass

import torch

from probeserve.errors import BundleError


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
class ProbeHeads:
    """The NullHead and PointerHead weights (float32)."""

    null_weight: torch.Tensor  # [2, d]
    null_bias: torch.Tensor  # [2]
    start_weight: torch.Tensor  # [d, d]
    end_weight: torch.Tensor  # [d, d]

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
