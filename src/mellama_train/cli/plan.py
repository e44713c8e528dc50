"""`mellama-train plan`: the memory plan of a profile or recipe, per GPU, without starting anything."""

from __future__ import annotations

import argparse

from mellama_train.cli.common import error, fail
from mellama_train.config import ConfigError, resolve
from mellama_train.exit_codes import EXIT_CONFIG


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
    from mellama_train.data.pipeline import prepared_schedule
    from mellama_train.plan import make_plan, render

    try:
        cfg = resolve(args.profile, args.config, args.set, task=args.task)
        gpus = args.gpus or cfg.train.world_size or args.gpus_per_node
        gib = args.gpu_memory or cfg.train.gpu_memory_gib or 80.0
        plan = make_plan(cfg, args.model, gpus, args.gpus_per_node, gib)
    except ConfigError as exc:
        return fail(exc.problems)
    except ValueError as exc:
        return error(str(exc))
    print(render(plan))
    if schedule := prepared_schedule(cfg):  # a recipe over prepared corpora: its exact per-source epochs
        print("\n".join(["", *schedule]))
    return 0 if plan.fits else EXIT_CONFIG
