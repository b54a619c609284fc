"""Precision chosen at start-up, and the pairing check refusing what it must: real engine, real server.

AWQ checkpoints of the tiny model are made by the real quantizer (scripts/quantize_awq.py in its
own virtualenv, `make awq-env`). The "different fine-tune" is the tiny model with an unrelated
LoRA merged in: same architecture, tokenizer, embeddings and final norm, other attention weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from probeserve.core.errors import ProbeError
from probeserve.engines.config import resolve_precision
from probeserve.launcher import RunningServer, start_server
from probeserve_client import ProbeClient
from tests.support import awq
from tests.support.tiny_model import (
    AWQ_MIN_DECISION_AGREEMENT,
    CALIBRATION,
    CORPUS,
    TinyArtifacts,
    make_lookalike,
    set_tolerance,
)

CLI_TIMEOUT_S = 300


def _calibration_texts() -> list[str]:
    return [f"Function: {f}\n{u}\n\n" for f, u in CALIBRATION] + CORPUS


@pytest.fixture(scope="module")
def tiny_awq(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return awq.quantize(tiny.model_dir, tmp_path_factory.mktemp("awq") / "model", _calibration_texts())


@pytest.fixture(scope="module")
def lookalike_awq(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lookalike")
    lookalike = make_lookalike(tiny.model_dir, root / "fp32", "lora")
    return awq.quantize(lookalike, root / "awq", _calibration_texts())


@pytest.fixture(scope="module")
def premerged_awq(tiny: TinyArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the tiny bundle's adapter folded in, then quantized (--merge-adapter)."""
    out = tmp_path_factory.mktemp("premerged") / "model"
    return awq.quantize(
        tiny.model_dir, out, _calibration_texts(), merge_adapter=tiny.bundle_dir / "lora_adapter"
    )


@pytest.fixture(scope="module")
def awq_server(
    tiny: TinyArtifacts, tiny_awq: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = start_server(
        bundle=tiny.bundle_dir,
        model=tiny_awq,
        precision="auto",  # a 4-bit checkpoint: awq
        log_path=tmp_path_factory.mktemp("awq-server") / "server.log",
        timeout_s=CLI_TIMEOUT_S,
    )
    yield running
    running.stop()


def _probeserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probeserve", *args, "--log-format", "json"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )  # fmt: skip


def _events(text: str, name: str) -> list[dict[str, object]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def test_quantizer_records_its_source(tiny: TinyArtifacts, tiny_awq: Path) -> None:
    record = json.loads((tiny_awq / "probeserve_quantization.json").read_text())
    assert set(record["source"]["files"]) >= {"model.safetensors", "config.json"}
    assert resolve_precision("auto", tiny_awq) == "awq"
    assert resolve_precision("auto", tiny.model_dir) in {"fp32", "bf16"}
    with pytest.raises(ProbeError, match="--precision awq"):
        resolve_precision("fp32", tiny_awq)
    with pytest.raises(ProbeError, match="not quantized"):
        resolve_precision("awq", tiny.model_dir)


def test_awq_checkpoint_passes_the_check_and_serves(awq_server: RunningServer, client: ProbeClient) -> None:
    passed = [e for e in awq_server.log_lines() if e.get("event") == "pairing_passed"]
    assert passed and passed[0]["precision"] == "awq" and passed[0]["lora_mode"] == "adapter"
    function = next(e for e in awq_server.log_lines() if e.get("event") == "pairing_function")
    assert float(str(function["decision_agreement"])) >= AWQ_MIN_DECISION_AGREEMENT
    assert float(str(function["logit_error"])) < 0.5
    with ProbeClient(awq_server.target, timeout=60) as awq_client:
        assert awq_client.info().precision == "awq_int4"
        quantized = awq_client.extract("book_flight", CALIBRATION[0][1])
    full = client.extract("book_flight", CALIBRATION[0][1])
    assert [s.name for s in quantized.slots] == [s.name for s in full.slots]


def test_awq_of_a_different_finetune_is_refused(
    tiny: TinyArtifacts, lookalike_awq: Path, tmp_path: Path
) -> None:
    # As quantize_awq.py wrote it, the checkpoint says what it was quantized from.
    recorded = _probeserve("check-pairing", "--bundle", str(tiny.bundle_dir), "--model", str(lookalike_awq))
    assert recorded.returncode == 3, recorded.stdout + recorded.stderr[-3000:]
    assert "FAIL provenance.quantized_from" in recorded.stdout
    # A third-party checkpoint without that record: embeddings and final norm match (the fine-tune
    # changed attention weights only), so the calibration references must catch it.
    anonymous = tmp_path / "anonymous-awq"
    shutil.copytree(lookalike_awq, anonymous)
    (anonymous / "probeserve_quantization.json").unlink()
    result = _probeserve("check-pairing", "--bundle", str(tiny.bundle_dir), "--model", str(anonymous))
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert "ok   provenance.embed_tokens" in result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed and failed[0].startswith(("FAIL function.", "FAIL sanity.adapter_applied")), result.stdout
    assert "threshold" in failed[0]


def test_serve_refuses_a_different_finetune_at_full_precision(tiny: TinyArtifacts, tmp_path: Path) -> None:
    lookalike = make_lookalike(tiny.model_dir, tmp_path / "lookalike", "steps")
    result = _probeserve(
        "serve",
        "--bundle",
        str(tiny.bundle_dir),
        "--model",
        str(lookalike),
        "--precision",
        "fp32",
        "--port",
        "0",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    failed = _events(result.stdout + result.stderr, "pairing_failed")
    assert failed and str(failed[0]["check"]).startswith("provenance."), result.stderr[-3000:]
    assert "sampled weights differ" in str(failed[0]["measured"])
    assert not _events(result.stdout + result.stderr, "serving")
    assert "pairing check provenance." in result.stderr


def test_unpacked_bundle_is_refused_at_awq_with_advice(
    tiny: TinyArtifacts, tiny_awq: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny.bundle_dir, bundle)
    (bundle / "pairing.json").unlink()
    result = _probeserve("check-pairing", "--bundle", str(bundle), "--model", str(tiny_awq))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "FAIL bundle.pairing" in result.stdout and "probeserve bundle pack" in result.stdout


def test_a_checkpoint_holding_the_adapter_serves_premerged(
    tiny: TinyArtifacts, premerged_awq: Path, tmp_path: Path
) -> None:
    """An AWQ checkpoint quantized with the bundle's adapter folded in: `auto` serves it without a
    per-request adapter (premerged), the pairing check passes (the folded adapter is the
    bundle's), and the same checkpoint with the adapter per request is refused (applied twice)."""
    # The tiny bundle's heads are random, so its scores swing with any rounding: folded and then
    # quantized, its calibration scores are 0.40 from the float32 references (its plain AWQ
    # checkpoint's, 0.26), over the default 0.35. A bundle carries its own tolerances: this copy
    # allows 0.5; the look-alike's 1.26 (test above) stays far outside.
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny.bundle_dir, bundle)
    set_tolerance(bundle, "awq", max_logit_error=0.5)
    server = start_server(
        bundle=bundle, model=premerged_awq, log_path=tmp_path / "server.log",
        extra_args=("--eager",), timeout_s=CLI_TIMEOUT_S,
    )  # fmt: skip
    try:
        started = next(e for e in server.log_lines() if e.get("event") == "engine_started")
        passed = next(e for e in server.log_lines() if e.get("event") == "pairing_passed")
        assert started["lora_mode"] == passed["lora_mode"] == "premerged"
        assert started["precision"] == "awq"
        with ProbeClient(server.target, timeout=60) as client:
            slots = client.extract("get_weather", "Is it raining in Oslo tomorrow?").slots
            assert [s.name for s in slots] == ["city", "unit"]
    finally:
        server.stop()
    twice = _probeserve("check-pairing", "--bundle", str(bundle), "--model", str(premerged_awq),
                        "--lora-mode", "adapter")  # fmt: skip
    assert twice.returncode == 3, twice.stdout + twice.stderr
    assert "FAIL structure.adapter_applied_once" in twice.stdout
