"""The CPU 4-bit matmul fallback against vLLM's own packing of weights (no engine needed)."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    pack_quantized_values_into_int32,
    unpack_quantized_values_into_int32,
)
from vllm.scalar_type import scalar_types

from probeserve.engines.vllm_plugin import dequantize, gemm_wna16


def _kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    """What vLLM's CPUWNA16 kernel does to a compressed-tensors [K/8, N] packed weight."""
    k = weight.shape[0]
    packed = pack_quantized_values_into_int32(weight, scalar_types.uint4, 0)
    unpacked = unpack_quantized_values_into_int32(packed, scalar_types.uint4, 0)
    by_output: torch.Tensor = pack_quantized_values_into_int32(unpacked, scalar_types.uint4, 1)
    return by_output.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()


@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_inverts_the_kernel_layout(symmetric: bool) -> None:
    k, n, group = 128, 96, 32
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.1).to(torch.bfloat16)
    packed_zeros = None if symmetric else pack_quantized_values_into_int32(zeros, scalar_types.uint4, 1)
    zero = torch.full_like(zeros, 8) if symmetric else zeros
    expected = (weight - zero.repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    got = dequantize(_kernel_layout(weight), scales, packed_zeros)
    torch.testing.assert_close(got, expected)

    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    out = torch.empty(5, n, dtype=torch.bfloat16)
    gemm_wna16(x, _kernel_layout(weight), out, scales, packed_zeros, bias, 8, "")
    torch.testing.assert_close(out, (x.float() @ got + bias).to(torch.bfloat16))
