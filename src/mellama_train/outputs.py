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
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mellama_train.config import Config
from mellama_train.integrity import atomic_write, read_capped

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
    """The commit of the checkout this package runs from; None for a regular install (site-packages may well
    sit inside some other repository, whose commit would be a lie)."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "pyproject.toml").is_file() or not (repo / "src" / "mellama_train").is_dir():
        return None
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


# Keys that may differ between a run's record and a `--resume auto` restart of it: they change when or how
# the run saves, logs, evaluates or guards itself, where its files live, or how memory is spent for the same
# math; never what is trained. Anything else (lr, seq_len, batch, sources, weights, max_steps: it reshapes the
# lr schedule, ...) differing means another run's checkpoints: refused unless `--resume PATH` names one.
MAY_DIFFER_ON_RESUME = frozenset(
    {
        "train.output_dir",  # the run directory was moved or is named by another path
        "train.resume",  # auto vs the explicit path that skips this check
        "train.ds_config",  # its path (cwd-dependent); the numbers it resolves to come from keys compared here
        "train.save_every",
        "train.keep_last",
        "train.log_every",
        "train.report_to",  # where metrics are also sent
        "train.eval_every",
        "train.eval_batches",
        "train.dist_timeout_minutes",  # hang detection: a requeued job may need other limits
        "train.watchdog_minutes",
        "train.max_consecutive_skips",  # fault policies: loosening one is how a stopped run is continued
        "train.loss_spike_factor",
        "train.skip_loss_spikes",
        "train.forgetting_source",  # what the forgetting monitor watches and does: the fix its stop prints
        "train.forgetting_margin",
        "train.stop_on_forgetting",
        "data.mixture_tolerance",  # the drift alarm's threshold
        "train.world_size",  # sizes a dry-run only; checkpoint.load judges a real world-size change
        "train.gpu_memory_gib",  # the start-up memory check only
        "train.loss_chunk_tokens",  # the same loss, computed in chunks
        "model.gradient_checkpointing",  # memory for compute, same math
        "model.attn_implementation",  # kernel choice (e.g. flash-attn installed on the new nodes)
        "lora.merge",  # the export step only
        "data.max_skip_fraction",  # raising these is the fix the skipped-record limit prints
        "data.skip_allowance",
        "data.max_record_bytes",  # raising it is the fix for too many too_large skips
        "data.accept_changes",  # --accept-data-change: the way on that a data-change refusal names
    }
)
# Per-source keys (data.sources.<name>.<key>) that may differ: notes and held-out evaluation.
SOURCE_KEYS_MAY_DIFFER = frozenset({"license", "eval_paths"})


def source_licenses(cfg: Config) -> dict[str, str | None]:
    """{source name: its license / data-use note (None: not given)}, for checkpoints and the model card."""
    return {src.name: src.license for src in cfg.data.sources}


RECORD_BYTES = 64 * 2**20
"""The largest run record read back: the config and the data manifest, megabytes at most."""


RECORD_NAME = re.compile(r"^run_record(\.\d{8}-\d{6})?\.json$")
"""The names write_run_record gives: run_record.json for a run's first start, run_record.<time>.json after."""


def run_records(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The run directory's records, newest start first, as JSON objects; read back untrusted: only the names
    write_run_record gives, regular files of at most RECORD_BYTES (a FIFO would block rank 0, a link to /dev/zero
    never end), and a record that is not a JSON object, or that the parser cannot walk, is passed over."""
    stamped = sorted(
        (p.name for p in run_dir.glob("run_record.*.json") if RECORD_NAME.match(p.name)), reverse=True
    )
    for name in [*stamped, "run_record.json"]:
        data = read_capped(run_dir / name, RECORD_BYTES)
        if data is None:
            continue
        try:
            record = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            continue
        if isinstance(record, dict):
            yield record


def latest_run_record(run_dir: Path) -> dict[str, Any] | None:
    """The record of the run directory's newest start (a resumed start adds run_record.<time>.json); records
    that cannot be read (not written by this trainer, or damaged) are passed over. A record returned is a JSON
    object whose `config` is one that config_changes can compare."""
    for record in run_records(run_dir):
        if not isinstance(record.get("config"), dict):
            continue
        try:
            flatten_config(record["config"])  # what same_run does with it: a record it cannot walk is damaged
        except (ValueError, RecursionError):
            continue
        return record
    return None


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted key: value}; sources are keyed by name, as `--set data.sources.mimic.weight`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted == "data.sources" and isinstance(value, list):
            # A record read back: an entry that is not a mapping is no source.
            sources = [s for s in value if isinstance(s, dict)]
            flat[dotted] = [s.get("name") for s in sources]  # added, removed or reordered sources
            for src in sources:
                flat.update(flatten_config(src, f"{dotted}.{src.get('name')}."))
        elif isinstance(value, dict) and value and dotted != "data.sources":
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _may_differ(key: str) -> bool:
    parts = key.split(".")
    if key.startswith("data.sources.") and len(parts) == 4:
        return parts[3] in SOURCE_KEYS_MAY_DIFFER
    return key in MAY_DIFFER_ON_RESUME


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every compared key that differs. Keys missing from the record (a field this
    version added) are not compared: the old run could not have set them."""
    old, new = flatten_config(recorded), flatten_config(current)
    return [
        f"{key}: {_show(old[key])} -> {_show(value)}"
        for key, value in new.items()
        if key in old and old[key] != value and not _may_differ(key)
    ]


def same_run(run_dir: Path, cfg: Config) -> bool:
    """The run directory's newest run record is of this run: the same config, but for MAY_DIFFER_ON_RESUME."""
    record = latest_run_record(run_dir)
    return record is not None and "config" in record and not config_changes(record["config"], cfg.to_dict())


def check_same_run(run_dir: Path, cfg: Config, resume_from: Path | None) -> None:
    """Refuse to `--resume auto` another run's checkpoints: the newest run record's config must match this
    one except in MAY_DIFFER_ON_RESUME. An explicit `--resume PATH` is the user saying so: not checked."""
    if resume_from is None or cfg.train.resume != "auto":
        return
    record = latest_run_record(run_dir)
    if record is None or "config" not in record:
        return  # nothing to compare with (a directory this trainer did not write)
    changes = config_changes(record["config"], cfg.to_dict())
    if changes:
        raise ValueError(
            f"{run_dir} holds checkpoints of a run with a different config (run_record.json): "
            f"{'; '.join(changes)}; use a new --output-dir, restore those values, or continue from the "
            f"checkpoint with the new values on purpose: --resume {resume_from}"
        )


def write_run_record(
    run_dir: Path,
    cfg: Config,
    ds_config: dict[str, Any],
    manifest: dict[str, Any],
    resumed_from: str | None,
    threads: dict[str, Any] | None = None,
) -> Path:
    """Written at every start; a resumed start keeps the earlier record and adds one of its own. `threads`:
    rank 0's torch threads and why (threads.py)."""
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "host": platform.node(),
        "threads": threads,
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
    # Atomic: a run killed while writing it must not leave a half record for the next start to compare with.
    _write_record(path, record)
    return path


def _write_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(record, indent=2, default=str))


def amend_run_record(path: Path, **fields: Any) -> None:
    """Update fields of this start's record once they are known (the checkpoint actually resumed from, after
    damaged ones were passed over)."""
    record = json.loads(path.read_text())
    record.update(fields)
    _write_record(path, record)
