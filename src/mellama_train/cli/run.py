"""`mellama-train pretrain` / `tune` (= launch/pretrain.py, launch/tune.py): parse -> resolve -> preflight (and
--dry-run) -> train. The flag names are a contract.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import yaml

from mellama_train.cli.common import (
    error,
    exit_together,
    fail,
    is_rank0,
    rank_line,
    traceback_if,
    unwritable_output_dir,
)
from mellama_train.config import NULL, Config, ConfigError, profile_names, resolve
from mellama_train.exit_codes import EXIT_CONFIG
from mellama_train.preflight import preflight

DESCRIPTIONS = {
    "pretrain": "Continual pretraining of a LLaMA model on a weighted mixture of corpora (DeepSpeed ZeRO).",
    "tune": "LoRA instruction tuning of a LLaMA model on a weighted mixture of instruction sets (DeepSpeed ZeRO).",
}


def run_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"launch/{task}.py", description=DESCRIPTIONS[task])
    p.add_argument(
        "--ds",
        "--deepspeed",  # HF Trainer's, LLaMA-Factory's and axolotl's spelling
        metavar="PATH",
        help="DeepSpeed JSON (default ds_configs/zero3.json) = train.ds_config",
    )
    p.add_argument(
        "--profile",
        default="tiny",
        help=f"named profile: {', '.join(profile_names(task))} (default tiny)",
    )
    p.add_argument("--config", metavar="PATH", help="recipe YAML applied over the profile")
    if task == "tune":
        p.add_argument(
            "--base",
            metavar="PATH",
            help="Hugging Face model directory to tune (e.g. final/ of a pretraining run), or a Hub id in the"
            " Hugging Face cache = model.path;"
            " its tokenizer is used unless model.tokenizer is set",
        )
    p.add_argument(
        "--init-adapter",
        metavar="PATH",
        help="continue training this PEFT adapter (e.g. <stage-1 run>/adapter) = model.init_adapter",
    )
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
    if task == "pretrain":
        p.add_argument(
            "--inspect",
            action="store_true",
            help="with --dry-run: also read a sample of every source and count it (= mellama-train data inspect)",
        )
    p.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an input error too (default: one line naming the fix)",
    )
    p.add_argument(  # a --set under another name, so it needs no alias of its own
        "--accept-data-change",
        dest="set",
        action="append_const",
        const="data.accept_changes=true",
        help="resume over data files that changed before the saved position, from the same coordinates"
        " (= --set data.accept_changes=true; each change is logged and kept in trainer.json)",
    )
    # DeepSpeed's launcher passes --local_rank; LOCAL_RANK in the environment is what we actually read.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def pretrain_parser() -> argparse.ArgumentParser:
    return run_parser("pretrain")


def config_from_args(args: argparse.Namespace, task: str = "pretrain") -> Config:
    aliases: dict[str, Any] = {
        "train.ds_config": args.ds,
        "train.output_dir": args.output_dir,
        "train.max_steps": args.max_steps,
        "train.save_every": args.save_every,
        "train.resume": args.resume,
        "model.init_adapter": args.init_adapter,
    }
    if getattr(args, "base", None):
        # --base replaces the profile's model: its weights, and its own tokenizer (a --set can still pick one).
        aliases.update({"model.init": "pretrained", "model.path": args.base, "model.tokenizer": NULL})
    return resolve(args.profile, args.config, args.set, aliases, task=task)


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
    lines.append(f"training:                {describe_training(cfg)}")
    if cfg.kind.by_epochs and not cfg.train.max_steps:
        lines.append(f"total steps:             from train.epochs ({cfg.train.epochs:g}) x the example count")
        lines.append("                         (computed once data.sources have paths)")
        return _finish_dry_run(lines, problems, missing, cfg)
    lines.append(f"total steps:             {d['total_steps']:,}")
    lines.append(f"warmup steps:            {d['warmup_steps']:,} ({cfg.optim.warmup_ratio:.0%} of total)")
    unit = cfg.kind.unit
    lines.append(f"total {unit}:{' ' * (18 - len(unit))}{d[f'total_{unit}']:,}")
    lines.append(f"{unit} per source at target weights (weights count {unit}):")
    per_source = d[f"{unit}_per_source"]
    for name, amount in per_source.items():
        share = cfg.source_fractions()[name]
        lines.append(f"  {name:<22} {share:6.1%}  {amount:,}")
    return _finish_dry_run(lines, problems, missing, cfg)


def _finish_dry_run(lines: list[str], problems: list[str], missing: list[str], cfg: Config) -> str:
    from mellama_train.data.pipeline import prepared_schedule
    from mellama_train.plan import make_plan, render

    lines += ["", *render_data_files(cfg)]
    if schedule := prepared_schedule(cfg):
        lines += ["", *schedule]
    try:
        lines += ["", render(make_plan(cfg))]
    except ValueError as exc:
        lines += ["", f"# memory plan unavailable: {exc}"]
    if missing:
        lines += ["", "# a real run still needs:"] + [f"  - {m}" for m in missing]
    if problems:
        lines += ["", "# problems:"] + [f"  - {p}" for p in problems]
    return "\n".join(lines)


def render_data_files(cfg: Config) -> list[str]:
    """What each source reads: its file count, and every file it found but leaves out, with why (the rules of
    data/selection.py). Problems with the paths themselves are listed under `# problems`."""
    from mellama_train.data.files import DataFileError
    from mellama_train.data.selection import of_source

    lines = ['# data files (docs/DATA.md, "What a source reads")']
    for src in cfg.data.sources:
        for key in ("paths", "eval_paths"):
            if not getattr(src, key):
                continue
            try:
                chosen = of_source(src, key, records=cfg.kind.records)
            except DataFileError:
                lines.append(f"{src.name}.{key}: see # problems")
                continue
            read = f"{len(chosen.files)} file{'s' if len(chosen.files) != 1 else ''} read"
            lines.append(f"{src.name}.{key}: {read}, {len(chosen.excluded)} left out")
            lines += [f"  - left out {path}: {why}" for path, why in chosen.excluded]
            if key == "paths":  # (held-out files share the globs: a miss there is expected)
                unmatched = chosen.unmatched
                lines += [f"  - warning: {glob} matched no file found; check the glob" for glob in unmatched]
    return lines


def describe_training(cfg: Config) -> str:
    """One line: what is trained, on what base, with which optimizer and backend."""
    lo, m = cfg.lora, cfg.model
    if lo.enabled:
        what = f"LoRA r={lo.r} alpha={lo.alpha:g} dropout={lo.dropout:g} on {len(lo.target_modules)} module types"
        what += (
            " of a 4-bit NF4 base (QLoRA)"
            if m.quantization == "nf4"
            else f" of a frozen {cfg.train.precision} base"
        )
    else:
        what = f"all weights in {cfg.train.precision}"
    backend = "one device, no DeepSpeed" if cfg.train.backend == "single" else "DeepSpeed"
    return f"{what}; {cfg.optim.optimizer}; {backend}; cutoff {cfg.data.seq_len} tokens"


def run_main(task: str, argv: list[str] | None = None) -> int:
    from mellama_train.preemption import report_exit

    code = _run(task, argv)
    report_exit(code)  # under `mellama-train launch`: the code survives a launcher that would lose it
    return code


def _run(task: str, argv: list[str] | None) -> int:
    args = run_parser(task).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_rank0() else logging.WARNING,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(args, task)
    except ConfigError as exc:
        traceback_if(args.debug)
        return fail(exc.problems)
    try:
        checked = preflight(cfg)
    except ValueError as exc:  # a data file that cannot be counted: one line naming it and the fix
        traceback_if(args.debug)
        return error(str(exc))
    problems, missing, cfg = checked.problems, checked.missing, checked.config
    if cfg.train.backend == "single" and args.ds and is_rank0():
        print(
            f"note: --ds {args.ds} is ignored: train.backend single runs without DeepSpeed", file=sys.stderr
        )
    if checked.examples is not None and is_rank0():
        logging.getLogger(__name__).info(
            "%g epochs over %d examples = %d steps", cfg.train.epochs, checked.examples, cfg.train.max_steps
        )
    if getattr(args, "inspect", False) and not args.dry_run:
        return error("--inspect goes with --dry-run (or run: mellama-train data inspect --config ...)")
    if args.dry_run:
        if is_rank0():
            print(render_dry_run(cfg, problems, missing))
            if getattr(args, "inspect", False) and not problems:
                print("\n" + "\n".join(_inspection(cfg)))
        return EXIT_CONFIG if problems else 0
    if problems or missing:
        return fail(problems + [f"missing {m}" for m in missing])
    if problem := unwritable_output_dir(cfg.train.output_dir):
        return error(problem)

    from mellama_train.evaluation import Forgetting
    from mellama_train.guard import Diverged
    from mellama_train.preemption import EXIT_PREEMPTED, Preempted
    from mellama_train.train import train  # heavy imports (torch, deepspeed) only for a real run

    try:
        run_dir = train(cfg)
    except Preempted as exc:
        rank_line(f"preempted (rank {os.environ.get('RANK', '0')}): {exc}")
        exit_together(EXIT_PREEMPTED)
    except (Diverged, Forgetting) as exc:  # not requeued: repeating the same steps would end the same way
        rank_line(f"stopped (rank {os.environ.get('RANK', '0')}): {exc}")
        exit_together(exc.exit_code)
    except ValueError as exc:  # our input errors (data files, resume refusals): one line naming the fix
        traceback_if(args.debug)
        rank_line(f"error (rank {os.environ.get('RANK', '0')}): {exc}")
        return EXIT_CONFIG
    if is_rank0():
        print(f"done: {run_dir}")
    return 0


def pretrain_main(argv: list[str] | None = None) -> int:
    return run_main("pretrain", argv)


def tune_main(argv: list[str] | None = None) -> int:
    return run_main("tune", argv)


def _inspection(cfg: Config) -> list[str]:
    """`--dry-run --inspect`: the default sample of every source, or one line saying why not."""
    from mellama_train.data import inspection

    try:
        return inspection.render(inspection.inspect(cfg, inspection.DEFAULT_SAMPLE_BYTES), cfg)
    except ValueError as exc:  # (DataFileError too) the tokenizer, a file, a reading process that died
        return [f"# data inspect unavailable: {exc}"]
