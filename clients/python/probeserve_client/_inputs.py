"""Items to extract, read from JSONL: one ``{"function": ..., "utterance": ...}`` object a line.

Optional keys ``request_id`` and ``bundle`` are kept; any other key (gold ``slots``, say) is
ignored, so training-data-shaped files work as they are. The command line (``batch``, ``stream``,
``loadtest --inputs``) and the repository's benchmarks read items this one way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from probeserve_client._types import ExtractItem


def parse_items(lines: Iterable[str], source: str) -> list[ExtractItem]:
    """Every non-empty line as an item; raises ``ValueError`` naming ``source`` and the bad line."""
    items: list[ExtractItem] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(
                ExtractItem(
                    str(row["function"]),
                    str(row["utterance"]),
                    str(row.get("request_id", "")),
                    str(row.get("bundle", "")),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source}:{number}: expected {{'function': ..., 'utterance': ...}}") from exc
    return items


def read_items(path: Path) -> list[ExtractItem]:
    """The items of a JSONL file; raises ``ValueError`` if a line is bad or there are none."""
    with path.open(encoding="utf-8") as f:
        items = parse_items(f, str(path))
    if not items:
        raise ValueError(f"{path}: no items")
    return items
