"""The command line, without starting an engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from probeserve.cli import main
from probeserve.core.bundle import Bundle
from probeserve.core.errors import ProbeError
from probeserve.engines.config import resolve_precision
from probeserve.transport.bundles import BundleSpec
from probeserve.transport.server import ServeConfig, check_config
from tests.support.tiny_model import TinyArtifacts


def test_missing_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--bundle", str(tmp_path / "nope"), "--model", str(tmp_path)])
    assert f"bundle directory {tmp_path / 'nope'} does not exist" in str(exit_info.value.code)


def test_tls_flags_go_together(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--bundle", str(tmp_path), "--model", str(tmp_path), "--tls-cert", "c.pem"])
    assert "--tls-cert and --tls-key go together" in str(exit_info.value.code)


def test_auto_precision_follows_the_cpu() -> None:
    assert resolve_precision("fp16") == "fp16"
    flags = Path("/proc/cpuinfo").read_text()
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_precision("auto") == ("bf16" if native_bf16 else "fp32")


def _settings(argv: list[str]) -> dict[str, object]:
    from probeserve.cli import _engine_settings, _parser

    return _engine_settings(_parser().parse_args(argv))


def test_lora_mode_auto_merges_only_a_lone_bundle(tiny: TinyArtifacts, word_punct_bundle_dir: Path) -> None:
    """One bundle at full precision: merged (the fastest); a second bundle or --admin needs
    adapters per request."""
    base = ["serve", "--model", str(tiny.model_dir), "--precision", "fp32", "--bundle", str(tiny.bundle_dir)]
    assert _settings(base)["lora_mode"] == "merged"
    assert _settings([*base, "--admin"])["lora_mode"] == "adapter"
    two = _settings([*base, "--bundle", f"wp={word_punct_bundle_dir}"])
    assert two["lora_mode"] == "adapter"
    assert two["bundles"] == (BundleSpec(tiny.bundle_dir), BundleSpec(word_punct_bundle_dir, "wp"))


def test_engine_sizes_its_adapter_slots_from_the_bundles(tiny_bundle: Bundle) -> None:
    one = ServeConfig(bundles=(), model=Path("m"), lora_mode="adapter")
    assert (one.engine_config([tiny_bundle]).max_loras, one.engine_config([tiny_bundle]).lora_rank) == (1, 8)
    admin = dataclasses.replace(one, admin=True)
    assert (admin.engine_config([tiny_bundle]).max_loras, admin.engine_config([tiny_bundle]).lora_rank) == (
        4,
        16,
    )
    assert one.engine_config([tiny_bundle] * 3).max_loras == 3
    merged = dataclasses.replace(one, lora_mode="merged")
    assert merged.engine_config([tiny_bundle]).adapter == tiny_bundle.adapter_path
    with pytest.raises(ProbeError, match="exactly one bundle"):
        merged.engine_config([tiny_bundle, tiny_bundle])


def test_an_open_admin_service_is_refused() -> None:
    """--admin beyond loopback needs auth: refused before anything starts."""
    admin = ServeConfig(bundles=(BundleSpec(Path("b")),), model=Path("m"), admin=True)
    with pytest.raises(ProbeError, match="--admin without auth"):
        check_config(dataclasses.replace(admin, host="0.0.0.0"))
    for allowed in (admin, dataclasses.replace(admin, host="::1"),
                    dataclasses.replace(admin, host="0.0.0.0", auth_tokens=("t",))):  # fmt: skip
        check_config(allowed)


def test_specialize_active_lora_reaches_vllm_only_with_adapters(
    tiny: TinyArtifacts, tiny_bundle: Bundle
) -> None:
    """--specialize-active-lora goes from the command line to vLLM's engine arguments; a merged
    adapter has no LoRA in the engine, so nothing to specialize."""
    from probeserve.engines.config import engine_kwargs

    base = ["serve", "--model", str(tiny.model_dir), "--precision", "fp32", "--bundle", str(tiny.bundle_dir)]
    assert _settings(base)["specialize_active_lora"] is None  # the server decides
    assert _settings([*base, "--specialize-active-lora"])["specialize_active_lora"] is True
    assert _settings([*base, "--no-specialize-active-lora"])["specialize_active_lora"] is False
    served = ServeConfig(bundles=(), model=tiny.model_dir, lora_mode="adapter", specialize_active_lora=True)
    assert engine_kwargs(served.engine_config([tiny_bundle]))["specialize_active_lora"] is True
    off = dataclasses.replace(served, specialize_active_lora=False, max_loras=8)
    assert engine_kwargs(off.engine_config([tiny_bundle]))["specialize_active_lora"] is False
    merged = dataclasses.replace(served, lora_mode="merged").engine_config([tiny_bundle])
    # dummy weights: the merge itself is skipped, the arguments are what is read
    assert "specialize_active_lora" not in engine_kwargs(dataclasses.replace(merged, load_format="dummy"))


@pytest.mark.parametrize(
    ("max_loras", "eager", "cuda", "expected"),
    [(8, False, True, True), (1, False, True, False), (8, True, True, False), (8, False, False, False)],
)
def test_specialize_active_lora_by_default_only_for_graphs_mixing_adapters(
    monkeypatch: pytest.MonkeyPatch, tiny: TinyArtifacts, tiny_bundle: Bundle,
    max_loras: int, eager: bool, cuda: bool, expected: bool,
) -> None:  # fmt: skip
    """Unless told, a server asks vLLM to specialize its graphs for the active adapters exactly
    when there are graphs (compiled, on a GPU) and more than one adapter slot to mix (measured on
    the H200: BENCHMARKS.md, "several bundles")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    served = ServeConfig(
        bundles=(), model=tiny.model_dir, lora_mode="adapter", max_loras=max_loras, enforce_eager=eager
    )
    assert served.engine_config([tiny_bundle]).specialize_active_lora is expected
