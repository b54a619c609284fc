"""The command line, without starting an engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from probeserve.cli import main
from probeserve.engines.config import resolve_precision


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
