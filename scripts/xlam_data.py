"""The xLAM-derived slot data and the demo bundle's train/validation split.

    python scripts/xlam_data.py [--data DIR]     # prints the split's sizes and rule
    python scripts/xlam_data.py --write-validation FILE   # its utterances as JSONL {function, utterance}

The data directory holds ``train.jsonl`` and ``function_schemas.json`` (see its README; license
CC-BY-NC-4.0). It is ``shared/data/xlam`` beside the repository (``<repo>/../shared/data/xlam``),
or ``--data``. No other data is ever used.

Split rule (deterministic, no RNG): an example is in the validation split iff
``int(sha256(function + "\\n" + utterance).hexdigest(), 16) % 100 < 8``, about 8%. Hashing the
(function, utterance) pair puts duplicate lines (the file has a few hundred) on the same side, so
no validation utterance is also trained on.

Gold slots with an empty span (``char_start == char_end``, value ``""``; 60 in the file) have
nothing a pointer could select; they are treated as absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FILE = "train.jsonl"
SCHEMAS_FILE = "function_schemas.json"
VALIDATION_PERCENT = 8
SPLIT_RULE = (
    f"validation iff int(sha256(function + '\\n' + utterance).hexdigest(), 16) % 100 < {VALIDATION_PERCENT}"
    f" over the lines of {TRAIN_FILE}; everything else is training; gold slots with an empty span"
    " count as absent"
)


@dataclass(frozen=True)
class GoldSlot:
    char_start: int
    char_end: int
    value: str


@dataclass(frozen=True)
class Example:
    line: int  # 0-based line number in train.jsonl
    function: str
    utterance: str
    slots: Mapping[str, GoldSlot] = field(default_factory=dict)


def default_data_dir() -> Path:
    return ROOT.parent / "shared" / "data" / "xlam"


def is_validation(function: str, utterance: str) -> bool:
    digest = hashlib.sha256(f"{function}\n{utterance}".encode()).hexdigest()
    return int(digest, 16) % 100 < VALIDATION_PERCENT


def load_schemas(data_dir: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((data_dir / SCHEMAS_FILE).read_text(encoding="utf-8"))
    return raw


def slot_names(schemas: Mapping[str, Any], function: str) -> list[str]:
    """The function's slots in prompt order (sorted by name)."""
    return sorted(schemas[function]["slots"])


def load_examples(data_dir: Path, schemas: Mapping[str, Any]) -> list[Example]:
    """Every line of train.jsonl, checked: known function, known slots, exact char spans."""
    examples: list[Example] = []
    with (data_dir / TRAIN_FILE).open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            obj = json.loads(line)
            function, utterance = obj["function"], obj["utterance"]
            if function not in schemas:
                raise ValueError(f"{TRAIN_FILE}:{i + 1}: unknown function {function!r}")
            known = set(schemas[function]["slots"])
            slots: dict[str, GoldSlot] = {}
            for name, span in obj.get("slots", {}).items():
                if name not in known:
                    raise ValueError(f"{TRAIN_FILE}:{i + 1}: slot {name!r} not in schema of {function}")
                gold = GoldSlot(int(span["char_start"]), int(span["char_end"]), str(span["value"]))
                if utterance[gold.char_start : gold.char_end] != gold.value:
                    raise ValueError(f"{TRAIN_FILE}:{i + 1}: span of {name!r} does not match its value")
                if gold.char_end <= gold.char_start:
                    continue  # an empty gold span (60 lines have one): nothing to point at, so absent
                slots[name] = gold
            examples.append(Example(line=i, function=function, utterance=utterance, slots=slots))
    return examples


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, validation) by :data:`SPLIT_RULE`, each in file order."""
    train = [e for e in examples if not is_validation(e.function, e.utterance)]
    val = [e for e in examples if is_validation(e.function, e.utterance)]
    return train, val


def load_split(data_dir: Path | None = None) -> tuple[dict[str, Any], list[Example], list[Example]]:
    data_dir = data_dir or default_data_dir()
    schemas = load_schemas(data_dir)
    train, val = split(load_examples(data_dir, schemas))
    return schemas, train, val


Prediction = Mapping[str, str | None]  # slot -> value (None: absent)


def score(
    examples: Sequence[Example], predictions: Sequence[Prediction], schemas: Mapping[str, Any]
) -> dict[str, Any]:
    """Exact match over gold-present slots and presence accuracy over all schema slots.

    The one definition every figure uses (evaluate.py, precision_table.py).
    """
    gold_present = exact = slots = presence_ok = 0
    for example, predicted in zip(examples, predictions, strict=True):
        for slot in sorted(schemas[example.function]["slots"]):
            gold = example.slots.get(slot)
            value = predicted.get(slot)
            slots += 1
            presence_ok += (gold is not None) == (value is not None)
            if gold is not None:
                gold_present += 1
                exact += value == gold.value
    return {
        "exact_match": round(exact / max(gold_present, 1), 4),
        "presence_accuracy": round(presence_ok / max(slots, 1), 4),
        "examples": len(examples),
        "gold_present_slots": gold_present,
        "schema_slots": slots,
    }


ERROR_KINDS = ("extra_edge_characters", "too_long", "too_short", "wrong", "missed", "false_presence")


def error_kind(gold: str | None, predicted: str | None) -> str | None:
    """What is wrong with one slot's answer, or None when it is right.

    ``extra_edge_characters``: the gold value plus punctuation or whitespace at its edges (what a
    token that fuses a word with the next mark gives); ``too_long``/``too_short``: the gold value
    inside the answer, or the answer inside it; ``wrong``: anything else; ``missed`` and
    ``false_presence``: the presence decision is wrong.
    """
    if gold is None:
        return None if predicted is None else "false_presence"
    if predicted is None:
        return "missed"
    if predicted == gold:
        return None
    at = predicted.find(gold)
    if at >= 0:
        extra = predicted[:at] + predicted[at + len(gold) :]
        return "too_long" if any(c.isalnum() for c in extra) else "extra_edge_characters"
    return "too_short" if predicted in gold else "wrong"


def errors(
    examples: Sequence[Example], predictions: Sequence[Prediction], schemas: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Every wrong slot with its kind, the utterance, the gold and the predicted value."""
    found = []
    for example, predicted in zip(examples, predictions, strict=True):
        for slot in sorted(schemas[example.function]["slots"]):
            gold = example.slots.get(slot)
            want = None if gold is None else gold.value
            kind = error_kind(want, predicted.get(slot))
            if kind is not None:
                found.append({"kind": kind, "line": example.line + 1, "function": example.function,
                              "slot": slot, "gold": want, "predicted": predicted.get(slot),
                              "utterance": example.utterance})  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Show the xLAM train/validation split.")
    parser.add_argument("--data", type=Path, default=None, help="data directory (default: %(default)s)")
    parser.add_argument(
        "--write-validation", type=Path, metavar="FILE",
        help="write the validation utterances as JSONL (the input of `probeserve bundle pack --calibration`)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    data_dir = args.data or default_data_dir()
    schemas, train, val = load_split(data_dir)
    if args.write_validation:
        rows = [{"function": e.function, "utterance": e.utterance} for e in val]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        args.write_validation.write_text(text, encoding="utf-8")
    n_slots = sum(len(schemas[e.function]["slots"]) for e in val)
    n_present = sum(len(e.slots) for e in val)
    print(f"data: {data_dir}")
    print(f"functions: {len(schemas)}; train: {len(train)} examples; validation: {len(val)} examples")
    print(f"validation slots: {n_slots} schema slots, {n_present} present in gold")
    print(f"rule: {SPLIT_RULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
