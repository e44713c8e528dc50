"""`mellama-train eval-harness`: lm-evaluation-harness on an exported model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mellama_train.cli.common import error, traceback_if


def eval_harness_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train eval-harness",
        description="Run EleutherAI's lm-evaluation-harness (extra: mellama-train[eval]) on a Hugging Face model"
        " directory (an export, or a run's final/), print a table and write the scores as JSON.",
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="an exported model (`mellama-train export`) or final/"
    )
    p.add_argument(
        "--tasks",
        default="pubmedqa,medqa,medmcqa",
        help="comma-separated: pubmedqa, medqa (= medqa_4options), medmcqa, or any lm-eval task name"
        " (default: the three)",
    )
    p.add_argument("--include-path", metavar="DIR", help="a directory of local lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="evaluate only the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=1, help="default 1")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (the model's own, default), bfloat16, float32")
    p.add_argument("--out", metavar="PATH", help="results JSON (default MODEL_DIR/eval-harness.json)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from mellama_train import eval_harness

    try:
        report = eval_harness.run(
            Path(args.model_dir),
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            Path(args.include_path) if args.include_path else None,
            args.limit,
            args.num_fewshot,
            args.batch_size,
            args.device,
            args.dtype,
        )
    except ValueError as exc:
        traceback_if(args.debug)
        return error(str(exc))
    out = eval_harness.write(
        report, Path(args.out) if args.out else Path(args.model_dir) / "eval-harness.json"
    )
    print("\n".join(eval_harness.table(report)))
    print(f"\nresults: {out}")
    return 0
