"""Command line: parse -> resolve config -> validate (and --dry-run) -> train.

`launch/pretrain.py` = `mellama-train pretrain`, `launch/tune.py` = `mellama-train tune` (same flags, plus
`--base`), and `mellama-train merge` folds an adapter into its base. The flag names are a contract.
`mellama-train launch LAUNCHER ...` runs a launcher (deepspeed, torchrun) so that a stop signal reaches every
rank and its exit code survives (preemption.supervise).

Every failure a user can fix is one line naming the fix (exit 2); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mellama_train.config import NULL, Config, ConfigError, profile_names, resolve, validate
from mellama_train.exit_codes import EXIT_CONFIG

DESCRIPTIONS = {
    "pretrain": "Continual pretraining of a LLaMA model on a weighted mixture of corpora (DeepSpeed ZeRO).",
    "tune": "LoRA instruction tuning of a LLaMA model on a weighted mixture of instruction sets (DeepSpeed ZeRO).",
}


def run_parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"launch/{task}.py", description=DESCRIPTIONS[task])
    p.add_argument(
        "--ds", metavar="PATH", help="DeepSpeed JSON (default ds_configs/zero3.json) = train.ds_config"
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
            help="Hugging Face model directory to tune (e.g. final/ of a pretraining run) = model.path;"
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
    if cfg.task == "tune" and not cfg.train.max_steps:
        lines.append(f"total steps:             from train.epochs ({cfg.train.epochs:g}) x the example count")
        lines.append("                         (computed once data.sources have paths)")
        return _finish_dry_run(lines, problems, missing, cfg)
    lines.append(f"total steps:             {d['total_steps']:,}")
    lines.append(f"warmup steps:            {d['warmup_steps']:,} ({cfg.optim.warmup_ratio:.0%} of total)")
    if cfg.task == "tune":
        lines.append(f"total examples:          {d['total_examples']:,}")
        lines.append("examples per source at target weights (weights count examples):")
        per_source = d["examples_per_source"]
    else:
        lines.append(f"total tokens:            {d['total_tokens']:,}")
        lines.append("tokens per source at target weights (weights count tokens):")
        per_source = d["tokens_per_source"]
    for name, amount in per_source.items():
        share = cfg.source_fractions()[name]
        lines.append(f"  {name:<22} {share:6.1%}  {amount:,}")
    return _finish_dry_run(lines, problems, missing, cfg)


def _finish_dry_run(lines: list[str], problems: list[str], missing: list[str], cfg: Config) -> str:
    from mellama_train.plan import make_plan, render

    lines += ["", *render_data_files(cfg)]
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
    from mellama_train.data.readers import DataFileError
    from mellama_train.data.selection import of_source

    lines = ['# data files (docs/DATA.md, "What a source reads")']
    for src in cfg.data.sources:
        for key in ("paths", "eval_paths"):
            if not getattr(src, key):
                continue
            try:
                chosen = of_source(src, key, records=cfg.task == "tune")
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


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_main(task: str, argv: list[str] | None = None) -> int:
    from mellama_train.preemption import report_exit

    code = _run(task, argv)
    report_exit(code)  # under `mellama-train launch`: the code survives a launcher that would lose it
    return code


def _run(task: str, argv: list[str] | None) -> int:
    args = run_parser(task).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if _is_rank0() else logging.WARNING,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(args, task)
    except ConfigError as exc:
        _traceback_if(args.debug)
        return _fail(exc.problems)
    problems, missing = validate(cfg)
    if cfg.train.backend == "single" and args.ds and _is_rank0():
        print(
            f"note: --ds {args.ds} is ignored: train.backend single runs without DeepSpeed", file=sys.stderr
        )
    if not problems and not missing:
        from mellama_train.data.pipeline import plan_epochs

        try:
            examples = plan_epochs(cfg)
        except ValueError as exc:  # a data file that cannot be read: one line naming it and the fix
            _traceback_if(args.debug)
            return _error(str(exc))
        if examples is not None and _is_rank0():
            logging.getLogger(__name__).info(
                "%g epochs over %d examples = %d steps", cfg.train.epochs, examples, cfg.train.max_steps
            )
    if getattr(args, "inspect", False) and not args.dry_run:
        return _error("--inspect goes with --dry-run (or run: mellama-train data inspect --config ...)")
    if args.dry_run:
        if _is_rank0():
            print(render_dry_run(cfg, problems, missing))
            if getattr(args, "inspect", False) and not problems:
                print("\n" + "\n".join(_inspection(cfg)))
        return EXIT_CONFIG if problems else 0
    if problems or missing:
        return _fail(problems + [f"missing {m}" for m in missing])
    if problem := _unwritable_output_dir(cfg.train.output_dir):
        return _error(problem)

    from mellama_train.evaluation import Forgetting
    from mellama_train.guard import Diverged
    from mellama_train.preemption import EXIT_PREEMPTED, Preempted
    from mellama_train.train import train  # heavy imports (torch, deepspeed) only for a real run

    try:
        run_dir = train(cfg)
    except Preempted as exc:
        _rank_line(f"preempted (rank {os.environ.get('RANK', '0')}): {exc}")
        _exit_together(EXIT_PREEMPTED)
    except (Diverged, Forgetting) as exc:  # not requeued: repeating the same steps would end the same way
        _rank_line(f"stopped (rank {os.environ.get('RANK', '0')}): {exc}")
        _exit_together(exc.exit_code)
    except ValueError as exc:  # our input errors (data files, resume refusals): one line naming the fix
        _traceback_if(args.debug)
        _rank_line(f"error (rank {os.environ.get('RANK', '0')}): {exc}")
        return EXIT_CONFIG
    if _is_rank0():
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


def data_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train data",
        description="Inspect a recipe's corpora: per source, the files read and left out, records, documents"
        " and tokens, every reason a record is not trained on, document lengths, and how many times the"
        " planned run goes through it. Reads a sample of a large corpus (estimates, said to be), all of a small"
        " one (exact). No text is printed.",
    )
    p.add_argument("action", choices=["inspect"])
    p.add_argument("--profile", default="tiny", help="named profile (default tiny)")
    p.add_argument("--config", metavar="PATH", help="recipe YAML applied over the profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--full", action="store_true", help="read every file (exact counts)")
    amount.add_argument(
        "--sample-mb",
        type=float,
        default=None,
        metavar="MB",
        help="file MiB read per source (default 256); a smaller source is read whole",
    )
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="reading processes (default: cores)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mellama_train.data import inspection
    from mellama_train.data.readers import DataFileError

    try:
        cfg = resolve(args.profile, args.config, args.set)
        problems, _ = validate(cfg)
        if problems:
            return _fail(problems)
        if args.json:  # an unwritable path is named before the reading, not after it
            with open(args.json, "a"):
                pass
        budget = (
            None if args.full else inspection.sample_size(256 if args.sample_mb is None else args.sample_mb)
        )
        reports = inspection.inspect(cfg, budget, args.workers)
    except ConfigError as exc:
        return _fail(exc.problems)
    except OSError as exc:
        return _error(f"--json: {_os_error(exc)}")
    except (DataFileError, ValueError) as exc:
        return _error(str(exc))
    print("\n".join(inspection.render(reports, cfg)))
    if args.json:
        figures = [inspection.as_dict(r, cfg.data.seq_len) for r in reports]
        with open(args.json, "w") as out:
            out.write(json.dumps(figures, indent=2) + "\n")
    return 0


def plan_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train plan",
        description="Predicted peak GPU memory, host RAM and checkpoint disk of a run, before it starts.",
    )
    p.add_argument(
        "--task", choices=["pretrain", "tune"], default="pretrain", help="entry point (default pretrain)"
    )
    p.add_argument("--profile", default="8gb", help="named profile (default 8gb)")
    p.add_argument("--config", metavar="PATH", help="recipe YAML applied over the profile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field")
    p.add_argument(
        "--model",
        metavar="DIR_OR_PRESET",
        help="an HF model directory or a preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b);"
        " default: model.path, else the profile's model.arch",
    )
    p.add_argument("--gpus", type=int, default=0, help="DeepSpeed profiles: GPUs in all (default one node)")
    p.add_argument(
        "--gpus-per-node", type=int, default=8, help="DeepSpeed profiles: GPUs per node (default 8)"
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=0.0,
        metavar="GIB",
        help="memory of one GPU (default: train.gpu_memory_gib, else 80)",
    )
    args = p.parse_args(argv)
    from mellama_train.plan import make_plan, render

    try:
        cfg = resolve(args.profile, args.config, args.set, task=args.task)
        gpus = args.gpus or cfg.train.world_size or args.gpus_per_node
        gib = args.gpu_memory or cfg.train.gpu_memory_gib or 80.0
        plan = make_plan(cfg, args.model, gpus, args.gpus_per_node, gib)
    except ConfigError as exc:
        return _fail(exc.problems)
    except ValueError as exc:
        return _error(str(exc))
    print(render(plan))
    return 0 if plan.fits else EXIT_CONFIG


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
    _watchdog_flag(p, "the merge")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import json

    base = args.base
    if base is None:
        config = Path(args.adapter) / "adapter_config.json"
        if not config.is_file():
            return _error(f"--adapter {args.adapter}: no adapter_config.json; pass a PEFT adapter directory")
        try:
            base = json.loads(config.read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            return _error(f"{config} is not a JSON object; pass the adapter directory PEFT wrote")
        if not base:
            return _error(f"{config} names no base model; pass --base")

    import torch

    from mellama_train.lora import merge_adapter

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        with _watched(args.watchdog_minutes, "merge"):
            out = merge_adapter(base, args.adapter, args.out, dtype, args.trust_remote_code)
    except ValueError as exc:
        _traceback_if(args.debug)
        return _error(str(exc))
    except OSError as exc:
        _traceback_if(args.debug)
        return _error(_os_error(exc))
    print(f"done: {out}")
    return 0


def launch_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train launch",
        description="Run a launcher so that a stop reaches every rank: SIGTERM, SIGINT (Ctrl-C), SIGUSR2 or"
        " SIGHUP sent to this process goes to each rank directly, which saves a checkpoint at its next step"
        " and exits 75; a second SIGTERM/SIGINT ends every process at once. Exits with the ranks' own code"
        " (75, 76, ...), which DeepSpeed's per-node launcher and torchrun would turn into 1. DeepSpeed and"
        " torchrun still start and place the ranks.",
        usage="mellama-train launch LAUNCHER [ARGS...]   e.g. mellama-train launch deepspeed --num_gpus 8"
        " launch/pretrain.py --ds ds_configs/zero3.json ...",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line, as you would run it")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    from mellama_train.preemption import supervise

    try:
        return supervise(command)
    except ValueError as exc:
        return _error(str(exc))


def status_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train status",
        description="Where a run stands: newest complete checkpoint, step, mixture ledger, speed and time left,"
        " fault counters, held-out losses. Exit 0, or 1 when an alarm (mixture drift, forgetting, a damaged"
        " checkpoint) is raised.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also hash every file of every checkpoint against its manifest's SHA-256 (reads them all)",
    )
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)

    from mellama_train.status import report

    try:
        lines, alarms = report(Path(args.run_dir), verify=args.verify)
    except Exception as exc:  # noqa: BLE001 (a run directory is read back untrusted: any failure is one line)
        _traceback_if(args.debug)
        return _error(_unreadable_run(args.run_dir, exc))
    print("\n".join(lines))
    return 1 if alarms else 0


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train report",
        description="A self-contained HTML page and PNG plots of a run (loss per source, lr, throughput,"
        " mixture against its target, skipped records), from its files; no TensorBoard server needed.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output directory")
    p.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report/)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)

    from mellama_train.report import write_report

    try:
        page, summary = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except Exception as exc:  # noqa: BLE001 (a run directory is read back untrusted: any failure is one line)
        _traceback_if(args.debug)
        return _error(_unreadable_run(args.run_dir, exc))
    print("\n".join(summary))
    print(f"\nreport: {page}")
    return 0


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
    _watchdog_flag(p, "the export")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from mellama_train.hf_export import VerificationFailed, export_checkpoint

    try:
        with _watched(args.watchdog_minutes, "export"):
            result = export_checkpoint(
                Path(args.checkpoint),
                Path(args.out_dir),
                args.dtype,
                args.max_shard_size,
                probe=not args.skip_probe,
                device=args.device,
            )
    except VerificationFailed as exc:
        _traceback_if(args.debug)
        print(f"export NOT verified: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        _traceback_if(args.debug)
        return _error(str(exc))
    except OSError as exc:
        _traceback_if(args.debug)
        return _error(_os_error(exc))
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
        _traceback_if(args.debug)
        return _error(str(exc))
    out = eval_harness.write(
        report, Path(args.out) if args.out else Path(args.model_dir) / "eval-harness.json"
    )
    print("\n".join(eval_harness.table(report)))
    print(f"\nresults: {out}")
    return 0


def decontaminate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mellama-train decontaminate",
        description="Build the n-gram index of benchmark files (PubMedQA, MedQA, MedMCQA: JSON lines or a JSON"
        " array/object of records; every string of a record is its text). A run with"
        " data.decontamination=OUT drops each training document or example that shares an n-gram with them,"
        " counted per source as data/decontaminated/<source>. With --scan, report how many records of"
        " training files overlap, without training.",
    )
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="FILE", help="benchmark files")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where to write the index (ngrams.npy, manifest)"
    )
    p.add_argument("--n", type=int, default=13, help="words per n-gram (default 13, as GPT-3's filter)")
    p.add_argument(
        "--scan",
        nargs="+",
        default=[],
        metavar="FILE",
        help="training files to check against the index (their text field: --text-field)",
    )
    p.add_argument("--text-field", default="text", help="the text field of --scan's JSON/CSV files")
    args = p.parse_args(argv)

    from mellama_train.data import decontam

    try:
        index, info = decontam.build_index([Path(b) for b in args.benchmarks], args.n)
        out = decontam.write_index(Path(args.out), index, info)
        print(f"index {out}: {info.ngrams:,} distinct {info.n}-grams")
        for f in info.files:
            short = f" ({f.too_short} shorter than {info.n} words: not matchable)" if f.too_short else ""
            print(f"  {f.path}: {f.records:,} records, {f.ngrams:,} n-grams{short}")
        if args.scan:
            loaded = decontam.Index(out)
            for path, (read, hits) in decontam.scan(loaded, args.scan, args.text_field).items():
                print(f"scan {path}: {hits:,} of {read:,} records overlap the benchmarks")
    except ValueError as exc:
        return _error(str(exc))
    except OSError as exc:  # e.g. --out names a file: one line, not a traceback
        return _error(_os_error(exc))
    print(f"use it: --set data.decontamination={out}")
    return 0


def _watchdog_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--watchdog-minutes",
        type=float,
        default=20.0,
        metavar="M",
        help=f"if {what} makes no progress for M minutes (a hung filesystem), print every thread's stack and"
        " exit 76 (default 20, as train.watchdog_minutes; 0: off)",
    )


@contextlib.contextmanager
def _watched(minutes: float, phase: str) -> Iterator[None]:
    """A standalone command under the hang watchdog (dumps to stderr: there is no run directory)."""
    from mellama_train.watchdog import Watchdog

    dog = Watchdog(minutes * 60, None, 0, limit_name="--watchdog-minutes").start()
    dog.enter(phase)
    try:
        yield
    finally:
        dog.stop()


def _exit_together(code: int) -> None:
    """Leave with `code` on every rank at the same moment. srun --kill-on-bad-exit ends a step as soon as one
    rank exits non-zero, so a rank still tearing down the interpreter would be killed and the step's status
    would read 143 instead of `code`. After a last barrier every rank exits at once, skipping the teardown
    (the checkpoint, metrics and logs are already closed and flushed)."""
    from mellama_train.backends import collectives
    from mellama_train.preemption import report_exit

    report_exit(code)  # before the barrier: a launcher may kill this rank as soon as a peer has exited
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    collectives.barrier()
    os._exit(code)


def _traceback_if(debug: bool) -> None:
    """--debug: the traceback of the exception being handled, before its one-line message. It holds code
    locations and the message only: no error of this project quotes record content (data/readers.py)."""
    if debug:
        traceback.print_exc(file=sys.stderr)


def _rank_line(line: str) -> None:
    """One line to stderr in ONE write: every rank prints its line at the same moment to the same terminal or
    log, and print()'s separate write of the newline let two ranks' lines run together (seen in CI)."""
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()


def _fail(problems: list[str]) -> int:
    """Configuration problems, all of them, one line each (rank 0 prints; every rank exits 2)."""
    if _is_rank0():
        print(ConfigError(problems), file=sys.stderr)
    return EXIT_CONFIG


def _error(message: str) -> int:
    """Any other input error: one line (rank 0 prints; every rank exits 2)."""
    if _is_rank0():
        print(f"error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _unreadable_run(run_dir: str, exc: Exception) -> str:
    """`status`/`report` failing on a run directory, as one line naming it: a refusal (ValueError) and a file
    that cannot be read (OSError, e.g. --out names a file) say what to fix; anything else (a file crafted or
    damaged past what the readers check) names the directory, the error's type and --debug."""
    if isinstance(exc, ValueError) and not isinstance(exc, (UnicodeError, json.JSONDecodeError)):
        message = " ".join(str(exc).splitlines())  # the readers' refusals name the file and the fix
        return message if run_dir in message else f"{run_dir}: {message}"
    if isinstance(exc, OSError):
        return _os_error(exc)
    return (
        f"{run_dir}: a file of this run directory could not be read ({type(exc).__name__}); check that it is a"
        " run directory this trainer wrote and that its files are intact; --debug prints the traceback"
    )


def _os_error(exc: OSError) -> str:
    """An OSError as one line naming the path, what the system said, and where to look."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}; check the path, its permissions and the free space there"


def _unwritable_output_dir(output_dir: str | None) -> str | None:
    """Why a run could not write its output dir, or None. Checked before the process group starts: found later,
    on rank 0 alone, it would be a traceback there and a wait for the collective timeout everywhere else."""
    if not output_dir:
        return None

    path = Path(output_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"--output-dir {output_dir}: {existing} is a file, not a directory; pass a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output-dir {output_dir}: {existing} is not writable by this user; pass a directory you can write"
    return None


def main(argv: list[str] | None = None) -> Any:
    """`mellama-train <command> ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "pretrain": pretrain_main,
        "tune": tune_main,
        "merge": merge_main,
        "launch": launch_main,
        "plan": plan_main,
        "status": status_main,
        "report": report_main,
        "export": export_main,
        "eval-harness": eval_harness_main,
        "decontaminate": decontaminate_main,
        "data": data_main,
    }
    if not argv or argv[0] not in commands:
        print(
            f"usage: mellama-train {{{','.join(commands)}}} [options]  (see --help of each)", file=sys.stderr
        )
        return EXIT_CONFIG
    return commands[argv[0]](argv[1:])
