"""Build the training data stream of one rank from the config: sources -> mixture -> packed micro-batches.

`check_sources(cfg)` (start-up validation and `--dry-run`) opens every file of every source first.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from mellama_train.config import Config
from mellama_train.data import pubmed
from mellama_train.data.decontam import load_index, screened
from mellama_train.data.encoding import document_encoder, make_encoder
from mellama_train.data.instruct import build_instruct_batches, build_instruct_eval_batches
from mellama_train.data.mixture import Mixture
from mellama_train.data.ordered import GlobalOrder, OrderedBatches
from mellama_train.data.packing import PackedBatches
from mellama_train.data.prepared import MANIFEST, open_sources, prepared_sources
from mellama_train.data.readers import count_records
from mellama_train.data.selection import declared_format, of_source
from mellama_train.data.source import Exhausted, SkipLimit, SourceStream, check_sources
from mellama_train.data.tokenizer import load_tokenizer

__all__ = [  # check_sources lives with the streams it checks for; it is part of this module's interface
    "build_eval_batches",
    "build_train_batches",
    "check_sources",
    "count_examples",
    "data_manifest",
    "document_encoder",
    "make_encoder",
    "open_order",
    "plan_epochs",
    "prepare_indexes",
    "prepared_schedule",
]


def build_train_batches(
    cfg: Config, tokenizer: Any, rank: int, world_size: int, index_dir: Path | None = None
) -> Any:
    """The endless, resumable micro-batch stream of one rank: packed documents (pretrain) or examples (tune).
    `index_dir`: where prepare_indexes kept the sources' PubMed update indexes (None: built in memory)."""
    if cfg.kind.records:
        return build_instruct_batches(cfg, tokenizer, rank, world_size)
    if prepared_sources(cfg):
        return OrderedBatches(
            open_order(cfg, tokenizer),
            rank,
            world_size,
            cfg.train.micro_batch_size,
            cfg.train.global_batch_size // (cfg.train.micro_batch_size * world_size),
            cfg.data.mixture_tolerance,
        )
    index = load_index(cfg.data.decontamination)
    streams = [
        SourceStream(
            src,
            screened(document_encoder(tokenizer, src.cleaners, src.min_chars), index),
            rank,
            world_size,
            cfg.data.seed,
            skip_limit=SkipLimit.of(cfg.data),
            max_record_bytes=cfg.data.max_record_bytes,
            accept_changes=cfg.data.accept_changes,
            index_dir=index_dir,
        )
        for src in cfg.data.sources
    ]
    weights = [src.weight for src in cfg.data.sources]
    mixture = Mixture(streams, weights, max_take=cfg.data.seq_len, tolerance=cfg.data.mixture_tolerance)
    return PackedBatches(mixture, cfg.data.seq_len, cfg.train.micro_batch_size)


def open_order(cfg: Config, tokenizer: Any) -> GlobalOrder:
    """The world-size-independent order over the recipe's prepared corpora (data/ordered.py)."""
    sources = open_sources(cfg, tokenizer)
    return GlobalOrder(sources, [src.weight for src in cfg.data.sources], cfg.data.seq_len, cfg.data.seed)


def prepared_schedule(cfg: Config) -> list[str]:
    """Exact token accounting of a run over prepared corpora, one line per source: tokens it holds, sequences an
    epoch gives, sequences the run takes, the epochs that makes and the step at which it first wraps (empty
    when the sources are not prepared; one line saying why when the corpus cannot be read)."""
    if not prepared_sources(cfg) or cfg.kind.records:
        return []
    lines = [
        f"# prepared corpora: exact tokens ({cfg.total_steps:,} steps of {cfg.train.global_batch_size}"
        f" sequences of {cfg.data.seq_len} tokens)",
        f"  {'source':<14} {'tokens':>15} {'seq/epoch':>12} {'seq trained':>12} {'epochs':>8}  wraps at step",
    ]
    try:
        order = open_order(cfg, load_tokenizer(cfg))
    except (ValueError, OSError) as exc:
        return [*lines[:1], f"  unavailable: {exc}"]
    given = order.given(cfg.total_steps * cfg.train.global_batch_size)
    for i, (src, source) in enumerate(zip(cfg.data.sources, order.sources)):
        wraps = order.wrap_step(i, cfg.train.global_batch_size)
        when = f"{wraps:,}" if wraps <= cfg.total_steps else "never (under one epoch)"
        lines.append(
            f"  {src.name:<14} {source.total_tokens:>15,} {order.windows[i]:>12,} {given[i]:>12,}"
            f" {given[i] / order.windows[i]:>8.3f}  {when}"
        )
    return lines


def prepare_indexes(cfg: Config, index_dir: Path) -> None:
    """Build (or check) the PubMed update index of every pretraining source that has PubMed XML files, once,
    on one rank before the others build their streams from it (data/pubmed.py)."""
    if cfg.kind.records:  # instruction records are never PubMed citations
        return
    for src in cfg.data.sources:
        if src.prepared:  # read with its index when it was prepared
            continue
        pubmed.prepare(of_source(src).files, index_dir, src.name, declared_format(src), reuse=False)


def build_eval_batches(
    cfg: Config, tokenizer: Any, rank: int, world_size: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's held-out micro-batches: one pass over every source's `eval_paths`, at most
    train.eval_batches per source. Pretraining packs each source's documents on their own (the last partial
    sequence is not evaluated); tuning pads examples. Each batch's source_ids name its source."""
    batches: list[dict[str, torch.Tensor]] = []
    for index, src in enumerate(cfg.data.sources):
        if not src.eval_paths:
            continue
        if cfg.kind.records:
            batches += build_instruct_eval_batches(
                cfg, tokenizer, index, rank, world_size, cfg.train.eval_batches
            )
            continue
        stream = SourceStream(
            src,
            document_encoder(tokenizer, src.cleaners, src.min_chars),
            rank,
            world_size,
            cfg.data.seed,
            paths=src.eval_paths,
            passes=1,
            skip_limit=SkipLimit.of(cfg.data),
            max_record_bytes=cfg.data.max_record_bytes,
        )
        packed = PackedBatches(Mixture([stream], [1.0]), cfg.data.seq_len, cfg.train.micro_batch_size)
        for _ in range(cfg.train.eval_batches):
            try:
                batch = next(packed)
            except Exhausted:
                break
            batch["source_ids"].fill_(index)
            batches.append(batch)
    return batches


def count_examples(cfg: Config) -> int:
    """Records in all sources' training files (one epoch of instruction tuning), malformed ones included."""
    return sum(
        count_records(path, declared_format(src))
        for src in cfg.data.sources
        for path in of_source(src, records=cfg.kind.records).files
    )


def plan_epochs(cfg: Config) -> int | None:
    """Tuning by epochs: set train.max_steps from the example count; returns the count (None: not by epochs)."""
    if not cfg.kind.by_epochs or not cfg.train.epochs or cfg.train.max_steps:
        return None
    examples = count_examples(cfg)
    cfg.train.max_steps = max(1, math.ceil(cfg.train.epochs * examples / cfg.train.global_batch_size))
    return examples


def data_manifest(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """Files of every source with size and modification time, for the run record (what exactly was read)."""
    manifest: dict[str, list[dict[str, Any]]] = {}
    for src in cfg.data.sources:
        if src.prepared:  # its manifest lists the files it was prepared from
            path = Path(src.prepared) / MANIFEST
            manifest[src.name] = [{"prepared": os.path.abspath(path), "sha256": _sha256(path)}]
            continue
        entries = []
        for path in of_source(src, records=cfg.kind.records).files:
            stat = os.stat(path)
            entries.append(
                {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}
            )
        manifest[src.name] = entries
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
