"""Command line: parse -> resolve config -> validate (and --dry-run) -> train.

`launch/pretrain.py` and `mellama-train pretrain` are the same entry point. The flag names are a contract.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import yaml

from mellama_train.config import Config, ConfigError, profile_names, resolve, validate

EXIT_CONFIG = 2


def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py",
        description="Continual pretraining of a LLaMA model on a weighted mixture of corpora (DeepSpeed ZeRO).",
    )
    p.add_argument(
        "--ds", metavar="PATH", help="DeepSpeed JSON (default ds_configs/zero3.json) = train.ds_config"
    )
    p.add_argument(
        "--profile", default="tiny", help=f"named profile: {', '.join(profile_names())} (default tiny)"
    )
    p.add_argument("--config", metavar="PATH", help="recipe YAML applied over the profile")
    p.add_argument(
        "--output-dir",
        metavar="PATH",
        help="run directory = train.output_dir (default runs/<profile>-<time>)",
    )
    p.add_argument("--max-steps", type=int, metavar="N", help="= train.max_steps")
    p.add_argument("--save-every", type=int, metavar="N", help="= train.save_every")
    p.add_argument("--resume", metavar="{auto,never,PATH}", help="= train.resume (default auto)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any field, e.g. --set optim.lr=1e-5 --set data.sources.mimic.weight=2",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and derived numbers, then exit"
    )
    # DeepSpeed's launcher passes --local_rank; LOCAL_RANK in the environment is what we actually read.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    aliases = {
        "train.ds_config": args.ds,
        "train.output_dir": args.output_dir,
        "train.max_steps": args.max_steps,
        "train.save_every": args.save_every,
        "train.resume": args.resume,
    }
    return resolve(args.profile, args.config, args.set, aliases)


def render_dry_run(cfg: Config, problems: list[str], missing: list[str]) -> str:
    d = cfg.derived()
    lines = [
        "# resolved config (profile <- recipe <- CLI)",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "",
    ]
    lines.append(f"# derived numbers (world size {d['world_size']}: WORLD_SIZE or train.world_size)")
    lines.append(f"grad_accum_steps:        {d['grad_accum_steps']}")
    lines.append(
        f"global batch:            {d['global_batch_sequences']} sequences = {d['global_batch_tokens']:,} tokens"
    )
    lines.append(f"total steps:             {d['total_steps']:,}")
    lines.append(f"warmup steps:            {d['warmup_steps']:,} ({cfg.optim.warmup_ratio:.0%} of total)")
    lines.append(f"total tokens:            {d['total_tokens']:,}")
    lines.append("tokens per source at target weights (weights count tokens):")
    for name, tokens in d["tokens_per_source"].items():
        share = cfg.source_fractions()[name]
        lines.append(f"  {name:<22} {share:6.1%}  {tokens:,}")
    if missing:
        lines += ["", "# a real run still needs:"] + [f"  - {m}" for m in missing]
    if problems:
        lines += ["", "# problems:"] + [f"  - {p}" for p in problems]
    return "\n".join(lines)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def pretrain_main(argv: list[str] | None = None) -> int:
    args = pretrain_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if _is_rank0() else logging.WARNING,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        return _fail(exc.problems)
    problems, missing = validate(cfg)
    if args.dry_run:
        if _is_rank0():
            print(render_dry_run(cfg, problems, missing))
        return EXIT_CONFIG if problems else 0
    if problems or missing:
        return _fail(problems + [f"missing {m}" for m in missing])

    from mellama_train.train import train  # heavy imports (torch, deepspeed) only for a real run

    try:
        run_dir = train(cfg)
    except ValueError as exc:  # our input errors (data files, resume refusals): one line naming the fix
        print(f"error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if _is_rank0():
        print(f"done: {run_dir}")
    return 0


def _fail(problems: list[str]) -> int:
    if _is_rank0():
        print(ConfigError(problems), file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> Any:
    """`mellama-train <command> ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"pretrain": pretrain_main}
    if not argv or argv[0] not in commands:
        print(
            f"usage: mellama-train {{{','.join(commands)}}} [options]  (see --help of each)", file=sys.stderr
        )
        return EXIT_CONFIG
    return commands[argv[0]](argv[1:])
