"""How evaluate.py scores answers and names what is wrong with them (scripts/xlam_data.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def xlam_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xlam_data", SCRIPTS / "xlam_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["xlam_data"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("gold", "predicted", "kind"),
    [
        ("Hello, World!", "Hello, World!", None),
        (None, None, None),
        ("Hello, World!", "Hello, World!'", "extra_edge_characters"),
        ("[3, 5, 7, 9, 11]", "[3, 5, 7, 9, 11].", "extra_edge_characters"),
        ("-5", " (-5", "extra_edge_characters"),
        ("Paris", "Paris to Tokyo", "too_long"),
        ("New York City", "New York", "too_short"),
        ("Paris", "Tokyo", "wrong"),
        ("Paris", None, "missed"),
        (None, "Paris", "false_presence"),
    ],
)
def test_error_kinds(
    xlam_data: ModuleType, gold: str | None, predicted: str | None, kind: str | None
) -> None:
    assert xlam_data.error_kind(gold, predicted) == kind


def test_errors_and_score_count_the_same_slots(xlam_data: ModuleType) -> None:
    gold = xlam_data.GoldSlot
    schemas: dict[str, dict[str, dict[str, object]]] = {"f": {"slots": {"a": {}, "b": {}, "c": {}}}}
    examples = [
        xlam_data.Example(0, "f", "x", {"a": gold(0, 1, "x"), "b": gold(0, 1, "x")}),
        xlam_data.Example(1, "f", "y", {"a": gold(0, 1, "y")}),
    ]
    predictions = [{"a": "x", "b": "x.", "c": "x"}, {"a": None}]
    found = xlam_data.errors(examples, predictions, schemas)
    assert [(e["line"], e["slot"], e["kind"]) for e in found] == [
        (1, "b", "extra_edge_characters"),
        (1, "c", "false_presence"),
        (2, "a", "missed"),
    ]
    scored = xlam_data.score(examples, predictions, schemas)
    assert scored["gold_present_slots"] == 3 and scored["exact_match"] == round(1 / 3, 4)
    assert scored["presence_accuracy"] == round(4 / 6, 4)
