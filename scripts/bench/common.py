"""What the benchmarks share: their inputs, percentiles, memory and host facts, and paths.

Every program in ``scripts/bench/`` runs as a script, so this directory is first on its
``sys.path`` and ``import common`` finds this module; it puts ``scripts/`` (the data split,
``xlam_data``) and ``scripts/bench/gpu/`` (the GPU harness's model maker) on the path once, here.

Inputs: a JSONL input file has one ``{"function": ..., "utterance": ...}`` object a line (other keys,
such as gold ``slots``, are ignored), so ``train.jsonl``-shaped files work as they are. Without
one, the demo bundle's validation split (``xlam_data.py``) is used: utterances the bundle was not
trained on, in file order, or a fixed-seed sample of them.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
for _path in (SCRIPTS, SCRIPTS / "bench" / "gpu"):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

from xlam_data import load_split  # noqa: E402

from probeserve_client import read_items  # noqa: E402

MIB = 1 << 20


@dataclass(frozen=True)
class Utterance:
    """One request to send: a function of the bundle and the text to read its slots from."""

    function: str
    utterance: str


def read_jsonl(path: Path) -> list[Utterance]:
    """Every non-empty line of ``path`` (the client's reader); ``ValueError`` names a bad line."""
    return [Utterance(item.function, item.utterance) for item in read_items(path)]


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


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a small sample; every benchmark takes it this way."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def memory_mib(root_pid: int) -> dict[str, float]:
    """RSS and PSS summed over a process and its descendants (PSS splits shared pages fairly)."""
    import psutil  # type: ignore[import-untyped]

    root = psutil.Process(root_pid)
    rss = pss = 0
    processes = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        processes += 1
    return {"rss_mib": round(rss / MIB, 1), "pss_mib": round(pss / MIB, 1), "processes": processes}


def host_cpu() -> dict[str, str]:
    """The CPU, how many, and the frequency governor (where the host exposes it)."""
    found = {"cpus": str(os.cpu_count())}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                found["cpu"] = line.split(":", 1)[1].strip()
                break
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    for name in ("scaling_governor", "scaling_driver", "scaling_max_freq"):
        with contextlib.suppress(OSError):
            found[name] = (cpufreq / name).read_text().strip()
    return found
