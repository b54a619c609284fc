"""Bundle loading: both head formats, shape checks, and no code execution on load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from probeserve.core.bundle import load_bundle
from probeserve.core.errors import BundleError
from tests.support.tiny_model import HIDDEN, LORA_RANK, TinyArtifacts


def _copy(tiny: TinyArtifacts, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(tiny.bundle_dir, dest)
    return dest


def test_loads_pt_bundle(tiny: TinyArtifacts) -> None:
    bundle = load_bundle(tiny.bundle_dir)
    assert bundle.name == "tiny"
    assert bundle.hidden_size == HIDDEN
    assert bundle.lora_rank == LORA_RANK
    assert list(bundle.functions) == ["book_flight", "get_weather"]
    assert bundle.functions["book_flight"].slot_names == ("date", "destination", "origin", "passengers")
    # No utterance_segmentation field, as in a bundle straight from the public recipe.
    assert "utterance_segmentation" not in json.loads((tiny.bundle_dir / "bundle.json").read_text())
    assert bundle.utterance_segmentation == "natural"


@pytest.mark.parametrize("layout", ["natural", "word_punct"])
def test_declared_utterance_layout_is_read(tiny: TinyArtifacts, tmp_path: Path, layout: str) -> None:
    dest = _copy(tiny, tmp_path)
    manifest = json.loads((dest / "bundle.json").read_text())
    (dest / "bundle.json").write_text(json.dumps(manifest | {"utterance_segmentation": layout}))
    assert load_bundle(dest).utterance_segmentation == layout


@pytest.mark.parametrize("layout", ["word-punct", "", None, 3])
def test_unknown_utterance_layout_is_refused_naming_the_field(
    tiny: TinyArtifacts, tmp_path: Path, layout: object
) -> None:
    dest = _copy(tiny, tmp_path)
    manifest = json.loads((dest / "bundle.json").read_text())
    (dest / "bundle.json").write_text(json.dumps(manifest | {"utterance_segmentation": layout}))
    refusal = r"bundle\.json: utterance_segmentation must be one of natural, word_punct"
    with pytest.raises(BundleError, match=refusal):
        load_bundle(dest)


def test_safetensors_heads_equal_pt_heads(tiny: TinyArtifacts, tmp_path: Path) -> None:
    dest = _copy(tiny, tmp_path)
    nested = torch.load(dest / "probe_heads.pt", weights_only=True)
    flat = {f"{h}.{k}": v for h, sub in nested.items() for k, v in sub.items()}
    (dest / "probe_heads.pt").unlink()
    save_file(flat, str(dest / "probe_heads.safetensors"))
    a, b = load_bundle(tiny.bundle_dir).heads, load_bundle(dest).heads
    assert torch.equal(a.start_weight, b.start_weight) and torch.equal(a.null_bias, b.null_bias)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


def test_pickled_code_is_refused(tiny: TinyArtifacts, tmp_path: Path) -> None:
    dest = _copy(tiny, tmp_path)
    torch.save({"null_head": _Payload()}, dest / "probe_heads.pt")
    with pytest.raises(BundleError, match="plain tensors"):
        load_bundle(dest)


def test_wrong_head_shape_is_refused(tiny: TinyArtifacts, tmp_path: Path) -> None:
    dest = _copy(tiny, tmp_path)
    heads = torch.load(dest / "probe_heads.pt", weights_only=True)
    heads["pointer_head"]["W_end.weight"] = torch.zeros(HIDDEN, HIDDEN + 1)
    torch.save(heads, dest / "probe_heads.pt")
    with pytest.raises(BundleError, match=r"W_end.weight has shape"):
        load_bundle(dest)


def test_missing_files_are_named(tiny: TinyArtifacts, tmp_path: Path) -> None:
    dest = _copy(tiny, tmp_path)
    (dest / "function_schemas.json").unlink()
    with pytest.raises(BundleError, match=r"function_schemas\.json"):
        load_bundle(dest)
