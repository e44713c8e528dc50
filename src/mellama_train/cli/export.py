"""`mellama-train export CHECKPOINT OUT`: one ZeRO checkpoint -> a verified Hugging Face directory."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mellama_train.cli.common import error, os_error, traceback_if, watchdog_flag, watched


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train export",
        description="Convert one ZeRO checkpoint (any step) into a Hugging Face model directory (sharded"
        " safetensors, config, tokenizer, model card), streaming shard by shard, then verify it: tensor names"
        " and parameter count, no empty or zeroed tensors, and the probe logits the training-time model"
        " recorded. Exit 0 verified, 1 written but not verified (left in OUT_DIR.partial), 2 not exportable.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="<run>/checkpoints/step_N, or <run> for its newest complete one",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for the model (must not hold files)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights dtype (default bf16)")
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        metavar="SIZE",
        help="largest safetensors file, e.g. 5GB or 500MB (default 2GB); host memory stays under"
        " SIZE + the largest tensor in fp32",
    )
    p.add_argument(
        "--skip-probe",
        action="store_true",
        help="skip the probe-logits check (it loads the exported model once, in fp32: 4 bytes/parameter)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the probe check runs: cpu (default), cuda, cuda:1, ..., or auto (accelerate spreads the"
        " model over GPUs, host memory and disk)",
    )
    watchdog_flag(p, "the export")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from mellama_train.export.verified import VerificationFailed, export_checkpoint

    try:
        with watched(args.watchdog_minutes, "export"):
            result = export_checkpoint(
                Path(args.checkpoint),
                Path(args.out_dir),
                args.dtype,
                args.max_shard_size,
                probe=not args.skip_probe,
                device=args.device,
            )
    except VerificationFailed as exc:
        traceback_if(args.debug)
        print(f"export NOT verified: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        traceback_if(args.debug)
        return error(str(exc))
    except OSError as exc:
        traceback_if(args.debug)
        return error(os_error(exc))
    gib = 1024**3
    print(
        f"exported {result.checkpoint} (step {result.step}) -> {result.out_dir}: {result.tensors} tensors,"
        f" {result.parameters:,} parameters, {result.shards} shard(s), {result.bytes_written / gib:.3f} GiB"
        f" {result.dtype}"
    )
    print(
        f"host memory: peak {result.peak_anon_bytes / gib:.3f} GiB anonymous during conversion (bound"
        f" {result.memory_bound_bytes / gib:.3f} GiB = largest shard + largest tensor in fp32)"
    )
    if result.probe.get("skipped"):
        print("verified: names, shapes, count, no empty/zeroed tensors; probe check SKIPPED (--skip-probe)")
    else:
        pr = result.probe
        print(
            f"verified: names, shapes, count, no empty/zeroed tensors; probe logits differ by"
            f" {pr['mean_diff_over_std']:.3%} of their spread on average (tolerance"
            f" {pr['tolerance_mean_over_std']:.2%}; largest {pr['max_diff_over_std']:.2%}), argmax agreement"
            f" {pr['argmax_agreement']:.1%}"
        )
    return 0
