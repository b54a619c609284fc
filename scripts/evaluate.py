"""Exact match and presence accuracy of a bundle, through the real server and the reference.

    python scripts/evaluate.py                       # demo bundle, validation split, fp32
    python scripts/evaluate.py --precision bf16 --no-reference
    python scripts/evaluate.py --target HOST:PORT    # an already running server

The server path sends every example once as a unary Extract and once inside one ExtractStream
(the real client; both must agree); ``--unary-only`` skips the stream (half the calls). The
reference path computes the recipe's formulas in plain transformers + peft
(probeserve.pairing.reference). Definitions, as in the training recipe:

- exact match: over slots present in gold, the slot is predicted present and its value equals
  the gold value;
- presence accuracy: over all schema slots of the examples;
- reachable ceiling: over slots present in gold, some span of utterance tokens (in the bundle's
  ``utterance_segmentation`` layout, cut as the server cuts values) is exactly the gold value;
  no pointer can do better;
- errors by kind (``xlam_data.error_kind``): extra edge characters, too long, too short, wrong,
  missed, false presence.

Prints these, and every slot where the server and the reference disagree (presence or value);
``--errors FILE`` writes every wrong slot (kind, utterance, gold, answer) as JSON lines, to read
before tuning anything: some gold labels contradict their utterance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xlam_data import ERROR_KINDS, Example, Prediction, errors, load_split, score

from probeserve.cli import DEMO_BUNDLE, DEMO_MODEL
from probeserve.core.bundle import load_bundle
from probeserve.launcher import start_server
from probeserve_client import ExtractItem, ProbeClient


def through_server(
    target: str, examples: Sequence[Example], *, stream: bool = True
) -> tuple[list[Prediction], list[Prediction] | None, float]:
    """Every example once as a unary Extract and (unless not ``stream``) once in one stream."""
    with ProbeClient(target, timeout=120) as client:
        started = time.perf_counter()
        unary: list[Prediction] = [
            dict(client.extract(e.function, e.utterance, request_id=f"u{e.line}").values()) for e in examples
        ]
        unary_s = time.perf_counter() - started
        if not stream:
            return unary, None, unary_s
        items = [ExtractItem(e.function, e.utterance, request_id=f"s{e.line}") for e in examples]
        streamed: list[Prediction] = []
        for example, result in zip(examples, client.stream(items, timeout=3600), strict=True):
            if result.extraction is None or result.request_id != f"s{example.line}":
                raise SystemExit(f"stream answered {result} for line {example.line}")
            streamed.append(dict(result.extraction.values()))
    return unary, streamed, unary_s


def through_reference(bundle_dir: Path, model: Path, examples: Sequence[Example]) -> list[Prediction]:
    from probeserve.pairing.reference import ReferenceModel

    reference = ReferenceModel(model, load_bundle(bundle_dir))
    return [
        {s.name: s.value for s in reference.extract(e.function, e.utterance) if s.present} for e in examples
    ]


def reachable_ceiling(bundle_dir: Path, model: Path, examples: Sequence[Example]) -> dict[str, Any]:
    """How many gold values some token span of the bundle's prompt layout produces exactly."""
    from probeserve.core.prompt import PromptBuilder
    from probeserve.core.spans import decode_span
    from probeserve.core.tokenization import HfPieceTokenizer

    bundle = load_bundle(bundle_dir)
    prompts = PromptBuilder.for_bundle(HfPieceTokenizer.from_pretrained(model), bundle)
    reachable = gold_present = 0
    for example in examples:
        if not example.slots:
            continue
        offsets = prompts.build(example.function, example.utterance).utterance_offsets
        values = {
            decode_span(example.utterance, offsets, i, j).value
            for i in range(len(offsets))
            for j in range(i, len(offsets))
        }
        gold_present += len(example.slots)
        reachable += sum(gold.value in values for gold in example.slots.values())
    return {
        "utterance_segmentation": bundle.utterance_segmentation,
        "reachable": reachable,
        "gold_present_slots": gold_present,
        "ceiling": round(reachable / max(gold_present, 1), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO_BUNDLE)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--precision", default="fp32", help="the server's precision (fp32 compares exactly)")
    parser.add_argument("--target", help="use a running server instead of starting one")
    parser.add_argument("--data", type=Path, help="folder with train.jsonl and function_schemas.json")
    parser.add_argument("--limit", type=int, help="only the first N validation examples")
    parser.add_argument("--no-reference", action="store_true", help="skip the transformers+peft path")
    parser.add_argument(
        "--unary-only", action="store_true",
        help="send each example as one unary call only, not also in a stream (half the time; at AWQ "
        "on a CPU the stream is the slower half); unary and stream agreeing is then not checked",
    )  # fmt: skip
    parser.add_argument(
        "--skip-pairing-check", action="store_true",
        help="start the server with --skip-pairing-check (to measure a model the check would refuse)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--errors", type=Path, help="write every wrong slot of the server here (JSON lines)")
    args = parser.parse_args()

    schemas, _train, validation = load_split(args.data)
    examples = validation[: args.limit] if args.limit else validation
    summary: dict[str, Any] = {
        "bundle": str(args.bundle), "model": str(args.model), "split": "validation",
        "precision": args.precision, "pairing_check_skipped": args.skip_pairing_check,
    }  # fmt: skip

    if args.target:
        unary, streamed, unary_s = through_server(args.target, examples, stream=not args.unary_only)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            server = start_server(
                bundle=args.bundle,
                model=args.model,
                precision=args.precision,
                log_path=Path(tmp) / "server.log",
                extra_args=("--skip-pairing-check",) if args.skip_pairing_check else (),
            )
            try:
                unary, streamed, unary_s = through_server(server.target, examples, stream=not args.unary_only)
            finally:
                server.stop()
    if streamed is not None and unary != streamed:
        differ = sum(u != s for u, s in zip(unary, streamed, strict=True))
        raise SystemExit(f"unary and streamed answers differ on {differ} examples")
    summary["calls"] = "unary only" if streamed is None else "unary and stream (equal)"
    summary["server"] = score(examples, unary, schemas) | {"unary_seconds": round(unary_s, 1)}
    wrong = errors(examples, unary, schemas)
    by_kind = {kind: sum(e["kind"] == kind for e in wrong) for kind in ERROR_KINDS}
    summary["server"]["errors_by_kind"] = by_kind
    summary["reachable"] = reachable_ceiling(args.bundle, args.model, examples)
    if args.errors:
        args.errors.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in wrong))

    if not args.no_reference:
        reference = through_reference(args.bundle, args.model, examples)
        summary["reference"] = score(examples, reference, schemas)
        disagreements = []
        for example, got, want in zip(examples, unary, reference, strict=True):
            for slot in sorted(schemas[example.function]["slots"]):
                if got.get(slot) != want.get(slot):
                    disagreements.append(
                        {"line": example.line + 1, "function": example.function, "slot": slot,
                         "server": got.get(slot), "reference": want.get(slot)}
                    )  # fmt: skip
        summary["slots_where_server_and_reference_differ"] = len(disagreements)
        for d in disagreements:
            print("differs:", json.dumps(d, ensure_ascii=False))
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
