"""Data pipeline throughput on one CPU core: our streaming mixture -> tokenize -> pack against the run_clm-style
pipeline users would otherwise write (datasets `interleave_datasets` with the same probabilities -> batched
`map` tokenize -> `group_texts`), same files (the tiny profile's three sample corpora), same tokenizer.

Each side runs in a fresh subprocess pinned to one core (OMP, Rayon and tokenizers threads = 1; `taskset` when
present), alternating A B A B ...; the baseline uses a fresh datasets cache each time (`keep_in_memory`, no
cache reuse between runs). The baseline makes one pass (`all_exhausted`) and counts its tokens; ours produces the
same number of tokens from its endless stream. Timed: from building the pipeline (reading the files included) to
its last block; imports, config and tokenizer loading are outside the clock on both sides.

    python bench/data_pipeline.py --pairs 5

Prints each run, then the median ratio ours / baseline with its range, and our tokens/s against the ~16k
tokens/s that a 13B model on 8 A100s consumes. Goals (issue 7): >= 1.5x, and >= 10x that consumption.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 2048
CONSUMPTION_13B_8XA100 = 16_000  # tokens/s (issue 7's reference figure)


def _setup() -> tuple[object, object]:
    """Imports, config and tokenizer: the same for both sides, and outside the clock (interpreter start-up and
    imports are ~9 s here, more than either pipeline's work)."""
    sys.path.insert(0, str(REPO / "src"))
    import datasets  # noqa: F401 - imported by both sides, so neither pays it inside the clock

    from mellama_train.config import resolve
    from mellama_train.data import pipeline  # noqa: F401
    from mellama_train.model import load_tokenizer

    cfg = resolve("tiny", overrides=[f"data.seq_len={SEQ_LEN}", "train.micro_batch_size=8"])
    return cfg, load_tokenizer(cfg)


def run_ours(tokens: int) -> dict:
    cfg, tokenizer = _setup()
    from mellama_train.data.pipeline import build_train_batches

    started = time.perf_counter()
    data = build_train_batches(cfg, tokenizer, rank=0, world_size=1)
    made = 0
    while made < tokens:
        made += next(data)["input_ids"].numel()
    return {"tokens": made, "seconds": time.perf_counter() - started}


def run_baseline(cache: str) -> dict:
    cfg, tokenizer = _setup()
    from datasets import Value, interleave_datasets, load_dataset

    from mellama_train.data.selection import expand_paths

    started = time.perf_counter()

    parts, weights = [], []
    for src in cfg.data.sources:
        files = expand_paths(src.paths, src.name)
        kind = "csv" if files[0].endswith((".csv", ".csv.gz")) else "json"
        ds = load_dataset(kind, data_files=files, split="train", cache_dir=cache, keep_in_memory=True)
        field = src.text_field or "text"
        ds = ds.select_columns([field])
        ds = ds if field == "text" else ds.rename_column(field, "text")
        parts.append(ds.cast_column("text", Value("string")))  # csv/json readers disagree on string width
        weights.append(src.weight)
    mixed = interleave_datasets(
        parts,
        probabilities=[w / sum(weights) for w in weights],
        seed=cfg.data.seed,
        stopping_strategy="all_exhausted",
    )

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"])

    def group_texts(
        batch: dict,
    ) -> dict:  # run_clm's: concatenate, cut into SEQ_LEN blocks, drop the remainder
        joined = {k: sum(batch[k], []) for k in batch}
        total = (len(joined["input_ids"]) // SEQ_LEN) * SEQ_LEN
        out = {k: [v[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, v in joined.items()}
        out["labels"] = out["input_ids"].copy()
        return out

    tokenized = mixed.map(tokenize, batched=True, remove_columns=["text"], keep_in_memory=True)
    grouped = tokenized.map(group_texts, batched=True, keep_in_memory=True)
    made = sum(len(ids) for ids in grouped["input_ids"])
    return {"tokens": made, "seconds": time.perf_counter() - started}


def side(name: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["HF_DATASETS_OFFLINE"] = "1"
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    cmd = [*pin, sys.executable, __file__, "--side", name, *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "ours":
        print(json.dumps(run_ours(args.tokens)))
        return
    if args.side == "baseline":
        print(json.dumps(run_baseline(args.cache)))
        return
    ratios, ours_rates = [], []
    for pair in range(args.pairs):
        with tempfile.TemporaryDirectory() as cache:
            b = side("baseline", "--cache", cache)
        a = side("ours", "--tokens", str(b["tokens"]))
        rate_a, rate_b = a["tokens"] / a["seconds"], b["tokens"] / b["seconds"]
        ratios.append(rate_a / rate_b)
        ours_rates.append(rate_a)
        print(
            f"pair {pair + 1}: baseline {rate_b:,.0f} tok/s ({b['tokens']:,} tokens), ours {rate_a:,.0f} tok/s,"
            f" ratio {rate_a / rate_b:.2f}",
            flush=True,
        )
    median_rate = statistics.median(ours_rates)
    print()
    print(
        "| pairs | median ours / baseline | min | max | ours tok/s (median) | x 13B-on-8xA100 consumption |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {len(ratios)} | {statistics.median(ratios):.2f} | {min(ratios):.2f} | {max(ratios):.2f} |"
        f" {median_rate:,.0f} | {median_rate / CONSUMPTION_13B_8XA100:.1f} |"
    )


if __name__ == "__main__":
    main()
