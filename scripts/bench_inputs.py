"""Utterances for the measuring scripts (loadtest.py, bench.py): a JSONL file or the validation split.

A JSONL input file has one ``{"function": ..., "utterance": ...}`` object a line (other keys,
such as gold ``slots``, are ignored), so ``train.jsonl``-shaped files work as they are. Without
one, the demo bundle's validation split (``xlam_data.py``) is used: utterances the bundle was not
trained on, in file order, or a fixed-seed sample of them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xlam_data import load_split


@dataclass(frozen=True)
class Utterance:
    """One request to send: a function of the bundle and the text to read its slots from."""

    function: str
    utterance: str


def read_jsonl(path: Path) -> list[Utterance]:
    """Every non-empty line of ``path``; raises ``ValueError`` naming the line on a bad one."""
    items: list[Utterance] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                items.append(Utterance(str(obj["function"]), str(obj["utterance"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: expected {{'function': ..., 'utterance': ...}}") from exc
    if not items:
        raise ValueError(f"{path}: no utterances")
    return items


def validation_utterances(data_dir: Path | None = None) -> list[Utterance]:
    """The validation split of the demo bundle's data, in file order."""
    _schemas, _train, validation = load_split(data_dir)
    return [Utterance(e.function, e.utterance) for e in validation]


def load_inputs(path: Path | None = None, data_dir: Path | None = None) -> list[Utterance]:
    """``path`` if given, else the validation split."""
    return read_jsonl(path) if path is not None else validation_utterances(data_dir)


def sample(items: Sequence[Utterance], n: int | None, seed: int) -> list[Utterance]:
    """``n`` distinct items drawn with ``seed`` (all of them, shuffled, if ``n`` is None or too big)."""
    count = len(items) if n is None else min(n, len(items))
    return random.Random(seed).sample(list(items), count)
