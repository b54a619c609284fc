"""The pairing table: what a look-alike checkpoint costs when nothing checks it, and the check's verdict.

    python scripts/pairing_table.py --right RIGHT_AWQ --lookalike LOOKALIKE_AWQ [--out FILE.json]

For each checkpoint: exact match and presence accuracy on the validation split through the real
server started with ``--skip-pairing-check`` (``scripts/evaluate.py --unary-only``), then
``probeserve check-pairing --keep-going`` (every check, even after a failed static one) with its
exit status and verdict lines. Prints a Markdown table and the FAIL lines; ``make pairing-table``
makes both checkpoints (``scripts/make_lookalike.py``, ``scripts/quantize_awq.py``) and runs this.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probeserve.cli import DEMO_BUNDLE

SCRIPTS = Path(__file__).resolve().parent


def exact_match(bundle: Path, model: Path, precision: str, limit: int | None) -> dict[str, Any]:
    """evaluate.py's summary for ``model`` served without the pairing check."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [
            sys.executable, str(SCRIPTS / "evaluate.py"), "--bundle", str(bundle), "--model", str(model),
            "--precision", precision, "--skip-pairing-check", "--unary-only", "--no-reference",
            "--json", str(out),
        ]  # fmt: skip
        if limit:
            cmd += ["--limit", str(limit)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary: dict[str, Any] = json.loads(out.read_text())
        return summary


def check_pairing(bundle: Path, model: Path, precision: str) -> dict[str, Any]:
    """``probeserve check-pairing --keep-going``: exit status and every verdict line."""
    cmd = [
        sys.executable, "-m", "probeserve", "check-pairing", "--bundle", str(bundle), "--model", str(model),
        "--precision", precision, "--keep-going", "--log-format", "json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok  ", "FAIL", "pairing:"))]
    if not lines:
        raise SystemExit(f"check-pairing printed no verdict (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"exit_status": proc.returncode, "lines": lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--right", type=Path, required=True, help="the bundle's own (AWQ) checkpoint")
    parser.add_argument("--lookalike", type=Path, required=True, help="a different fine-tune's checkpoint")
    parser.add_argument("--precision", default="awq")
    parser.add_argument("--limit", type=int, help="only the first N validation examples")
    parser.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    args = parser.parse_args()

    rows = []
    for label, model in (("right", args.right), ("look-alike", args.lookalike)):
        started = time.perf_counter()
        summary = exact_match(args.bundle, model, args.precision, args.limit)
        verdict = check_pairing(args.bundle, model, args.precision)
        rows.append(
            {"checkpoint": label, "model": str(model), "server": summary["server"], "check_pairing": verdict,
             "seconds": round(time.perf_counter() - started, 1)}
        )  # fmt: skip
        print(f"{label}: {json.dumps(rows[-1])}", file=sys.stderr)
    print("| checkpoint | exact match (pairing check skipped) | presence | `probeserve check-pairing` |")
    print("| --- | ---: | ---: | --- |")
    for row in rows:
        server, verdict = row["server"], row["check_pairing"]
        em = f"{server['exact_match']:.2%} ({round(server['exact_match'] * server['gold_present_slots'])}"
        em += f"/{server['gold_present_slots']})"
        last = f"{verdict['lines'][-1].removeprefix('pairing: ')}, exit {verdict['exit_status']}"
        print(f"| {row['checkpoint']} | {em} | {server['presence_accuracy']:.2%} | {last} |")
    for row in rows:
        print(f"\n{row['checkpoint']} ({row['model']}):")
        for line in row["check_pairing"]["lines"]:
            if line.startswith(("FAIL", "pairing:")):
                print(f"    {line}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
