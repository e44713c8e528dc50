"""`mellama-train merge --base B --adapter A --out O`: fold a LoRA adapter into its base."""

from __future__ import annotations

import argparse
import json
import logging
import unicodedata
from pathlib import Path

from mellama_train.cli.common import error, os_error, traceback_if, watchdog_flag, watched


def _unusable_base(base: object) -> str | None:
    """Why the adapter's base_model_name_or_path cannot name the base (missing, not a string, empty, holding a
    control character such as a newline), or None."""
    if base is None:
        return "is missing or null"
    if not isinstance(base, str):
        try:
            shown = json.dumps(base)
        except (ValueError, RecursionError):
            shown = "..."
        return f"is {shown if len(shown) <= 40 else shown[:37] + '...'} (a JSON {_json_type(base)})"
    if not base.strip():
        return "is empty"
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in base):  # controls, and bidi or zero-width marks
        return f"holds a control character ({base[:40]!r})"
    return None


def _json_type(value: object) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def merge_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train merge",
        description="Merge a LoRA adapter into its base and write a Hugging Face model (runs on CPU). Base and"
        " adapter are read from safetensors only: a pickle-only file (.bin) is refused, never unpickled.",
    )
    p.add_argument("--adapter", required=True, metavar="PATH", help="adapter directory (<run>/adapter)")
    p.add_argument("--base", metavar="PATH", help="base model directory (default: the one the adapter names)")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory for the merged model")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights dtype (default bf16)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the base")
    watchdog_flag(p, "the merge")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    base = args.base
    if base is not None and (problem := _unusable_base(base)):
        return error(f"--base {problem}; pass the base model's directory or Hub id")
    if base is None:
        config = Path(args.adapter) / "adapter_config.json"
        if not config.is_file():
            return error(f"--adapter {args.adapter}: no adapter_config.json; pass a PEFT adapter directory")
        try:
            adapter_config = json.loads(config.read_text(encoding="utf-8"))
        except OSError as exc:
            return error(os_error(exc))
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            adapter_config = None
        if not isinstance(adapter_config, dict):
            return error(f"{config} is not a JSON object; pass the adapter directory PEFT wrote")
        base = adapter_config.get("base_model_name_or_path")
        if problem := _unusable_base(base):
            return error(
                f"{config}: base_model_name_or_path {problem}, not a base model directory or Hub id;"
                " pass the base with --base"
            )
    from mellama_train.config import hub

    if hub.looks_like_hub_id(base):  # --base or the adapter's base may be a Hub id: the cached snapshot
        resolved = hub.local_path(base)
        if resolved == base:
            return error(hub.missing_message("--base", base))
        base = resolved

    import torch

    from mellama_train.lora import merge_adapter

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        with watched(args.watchdog_minutes, "merge"):
            out = merge_adapter(base, args.adapter, args.out, dtype, args.trust_remote_code)
    except ValueError as exc:
        traceback_if(args.debug)
        return error(str(exc))
    except OSError as exc:
        traceback_if(args.debug)
        return error(os_error(exc))
    print(f"done: {out}")
    return 0
