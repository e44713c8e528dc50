"""The run directory (a contract) and the run record written at start.

<output-dir>/
    run_record.json        resolved config, ds_config, package versions, git revision, data manifest
    metrics.jsonl          one JSON object per line, each with `step`
    tensorboard/           the same scalars for TensorBoard
    checkpoints/step_N/    DeepSpeed checkpoints (see checkpoint.py)
    final/                 Hugging Face model + tokenizer, written at the end
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mellama_train.config import Config

PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "datasets",
    "tokenizers",
    "sentencepiece",
    "safetensors",
    "mellama-train",
)


def default_output_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_record(
    run_dir: Path, cfg: Config, ds_config: dict[str, Any], manifest: dict[str, Any], resumed_from: str | None
) -> Path:
    """Written at every start; a resumed start keeps the earlier record and adds one of its own."""
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "host": platform.node(),
        "resumed_from": resumed_from,
        "config": cfg.to_dict(),
        "derived": cfg.derived(),
        "ds_config": ds_config,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "data_manifest": manifest,
    }
    path = run_dir / "run_record.json"
    if path.exists():
        path = run_dir / f"run_record.{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
