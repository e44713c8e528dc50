"""`mellama-train eval-harness MODEL_DIR --tasks pubmedqa,medqa,medmcqa`: EleutherAI's lm-evaluation-harness
(the optional extra `mellama-train[eval]`) on an exported or merged model directory.

The harness does the evaluating; this module only gives it the model the way this project writes it (a local
Hugging Face directory, remote code off), maps the Me-LLaMA paper's benchmark names to the harness's task names,
lets local task YAMLs in (`--include-path`: lm-eval's own mechanism, for machines without the Hub), and turns
the two common dead ends (the extra not installed, a task's data not reachable) into one line each. Per-sample
logging stays off: the results hold scores and counts, no benchmark or model text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

TASK_NAMES = {"pubmedqa": "pubmedqa", "medqa": "medqa_4options", "medmcqa": "medmcqa"}
"""The paper's names -> lm-eval's (others are passed through: any harness task, or one from --include-path)."""
INSTALL_HINT = "pip install 'mellama-train[eval]' (lm-eval-harness) into this environment"


def _harness() -> Any:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ValueError(f"lm-eval-harness is not installed ({exc.name} missing): {INSTALL_HINT}") from exc
    return lm_eval, TaskManager


def resolve_tasks(names: list[str], task_manager: Any) -> list[str]:
    tasks = [TASK_NAMES.get(n, n) for n in names]
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        hints = []
        for t in unknown:
            near = difflib.get_close_matches(t, sorted(known), n=3)
            hints.append(f"{t}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
        raise ValueError(
            f"--tasks: unknown to lm-eval-harness: {'; '.join(hints)}. Local task YAMLs are read with"
            " --include-path DIR"
        )
    return tasks


def _check_task_data(tasks: list[str], task_manager: Any) -> None:
    """Load each task's dataset before the model: a task whose data cannot be reached fails in seconds, with
    its name, not after the model has loaded."""
    for task in tasks:
        try:
            if hasattr(task_manager, "load"):  # lm-eval >= 0.4.10; get_task_dict before
                task_manager.load([task])
            else:
                from lm_eval.tasks import get_task_dict

                get_task_dict([task], task_manager)
        except Exception as exc:  # noqa: BLE001 - the datasets/hub error types vary by version: one line each
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise ValueError(
                f"task {task}: its data is not available ({type(exc).__name__}: {first}). lm-eval reads it from"
                " the Hugging Face Hub: run once where the Hub is reachable (it is cached in HF_DATASETS_CACHE),"
                " or give a local copy as a task YAML with --include-path DIR (docs/EVALUATION.md)"
            ) from exc


def run(
    model_dir: Path,
    tasks: list[str],
    include_path: Path | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Evaluate and return {model, tasks, results (per task: metric -> value), n-samples, n-shot, versions}."""
    lm_eval, task_manager_cls = _harness()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"{model_dir}: not a Hugging Face model directory (no config.json); pass an exported model"
            " (`mellama-train export`) or a run's final/"
        )
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a directory of task YAMLs")
    task_manager = task_manager_cls(include_path=str(include_path) if include_path else None)
    names = resolve_tasks(tasks, task_manager)
    _check_task_data(names, task_manager)
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
        tasks=names,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,  # no benchmark text or model output in what is kept
        task_manager=task_manager,
    )
    return {
        "model": str(model_dir),
        "tasks": names,
        "results": out["results"],
        "n-samples": out.get("n-samples", {}),
        "n-shot": out.get("n-shot", {}),
        "versions": out.get("versions", {}),
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
        "seconds": time.perf_counter() - started,
    }


def table(report: dict[str, Any]) -> list[str]:
    """One line per task and metric: value and its standard error where the harness gives one."""
    lines = [f"{'task':<24} {'metric':<12} {'value':>8} {'stderr':>8}  n"]
    for task, metrics in report["results"].items():
        n = report["n-samples"].get(task, {}).get("effective", "")
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if (
                metric.endswith("_stderr")
                or not isinstance(value, int | float)
                or metric in ("alias", "sample_len")
            ):
                continue
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            err = f"{stderr:8.4f}" if isinstance(stderr, int | float) else f"{'-':>8}"
            lines.append(f"{task:<24} {metric:<12} {value:8.4f} {err}  {n}")
    return lines


def write(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path
