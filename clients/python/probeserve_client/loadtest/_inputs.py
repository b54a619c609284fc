"""Where a load test's items come from: a JSONL file, or plain utterances made from GetInfo.

With no file, every function of the bundle gets one utterance that names its slots ("final
velocity with acceleration, initial velocity and time"), so any deployment can be loaded with
nothing but its address. Such utterances exercise the whole path (prompt, engine, heads) at
realistic lengths; their answers are not meant to be right.
"""

from __future__ import annotations

from probeserve_client._types import ExtractItem, ServerInfo


def _words(name: str) -> str:
    return name.replace("_", " ").strip()


def utterance_for(function: str, slots: list[str]) -> str:
    """A plain utterance naming a function and its slots."""
    words = [_words(s) for s in slots]
    if not words:
        return _words(function)
    listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
    return f"{_words(function)} with {listed}"


def items_from_info(info: ServerInfo, bundle: str = "") -> list[ExtractItem]:
    """One item per function of ``bundle`` (the server's default bundle when empty)."""
    if not info.bundles:
        raise ValueError("the server reports no bundle")
    chosen = next((b for b in info.bundles if b.name == bundle), None) if bundle else info.bundles[0]
    if chosen is None:
        names = ", ".join(b.name for b in info.bundles)
        raise ValueError(f"the server has no bundle {bundle!r} (it has {names})")
    if not chosen.functions:
        raise ValueError(f"bundle {chosen.name!r} has no functions")
    return [
        ExtractItem(fn.name, utterance_for(fn.name, [s.name for s in fn.slots]), bundle=bundle)
        for fn in chosen.functions
    ]
