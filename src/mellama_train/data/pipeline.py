"""Build the training data stream of one rank from the config: sources -> mixture -> packed micro-batches.

`check_sources(cfg)` (start-up validation and `--dry-run`) opens every file of every source first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from mellama_train.config import Config
from mellama_train.data import pubmed
from mellama_train.data.cleaners import get_cleaner
from mellama_train.data.decontam import load_index, screened
from mellama_train.data.files import Skip
from mellama_train.data.instruct import build_instruct_batches, build_instruct_eval_batches
from mellama_train.data.mixture import Mixture
from mellama_train.data.packing import PackedBatches
from mellama_train.data.readers import count_records
from mellama_train.data.selection import declared_format, of_source
from mellama_train.data.source import Exhausted, SkipLimit, SourceStream, check_sources

__all__ = [  # check_sources lives with the streams it checks for; it is part of this module's interface
    "build_eval_batches",
    "build_train_batches",
    "check_sources",
    "count_examples",
    "data_manifest",
    "document_encoder",
    "make_encoder",
    "plan_epochs",
    "prepare_indexes",
]


def make_encoder(tokenizer: Any):
    """Text -> token ids without special tokens.

    A fast (Rust) tokenizer is called directly through its public `backend_tokenizer`: the same `encode` the
    transformers wrapper ends in, without the wrapper's per-call Python work (a fifth of the pipeline's time on
    the sample corpora, docs/PERFORMANCE.md). Other tokenizers go through the wrapper."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:

        def encode_fast(text: str) -> list[int]:
            return backend.encode(text, add_special_tokens=False).ids

        return encode_fast

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def document_encoder(tokenizer: Any, cleaners: list[str], min_chars: int = 0):
    """Text -> cleaned BOS + tokens + EOS (LLaMA-2's document convention), or a Skip if nothing is left
    ("empty") or less than `min_chars` characters are ("too_short": a filter the source asked for).

    Special tokens are added by id rather than by `add_special_tokens`: some LLaMA tokenizer directories add
    no BOS, or drop BOS when asked for EOS, and the convention must not depend on such settings."""
    encode, clean = make_encoder(tokenizer), get_cleaner(cleaners)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode_document(text: str) -> list[int] | Skip:
        text = clean(text)
        if 0 < len(text.strip()) < min_chars:
            return Skip("too_short", f"{len(text.strip())} characters after cleaning, under min_chars")
        try:
            ids = encode(text)
        except (TypeError, ValueError, UnicodeError) as err:  # the tokenizer's own verdict on this record
            return Skip("tokenizer_rejected", type(err).__name__)
        return bos + ids + eos if ids else Skip("empty", "empty after cleaning")

    return encode_document


def build_train_batches(
    cfg: Config, tokenizer: Any, rank: int, world_size: int, index_dir: Path | None = None
) -> Any:
    """The endless, resumable micro-batch stream of one rank: packed documents (pretrain) or examples (tune).
    `index_dir`: where prepare_indexes kept the sources' PubMed update indexes (None: built in memory)."""
    if cfg.kind.records:
        return build_instruct_batches(cfg, tokenizer, rank, world_size)
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


def prepare_indexes(cfg: Config, index_dir: Path) -> None:
    """Build (or check) the PubMed update index of every pretraining source that has PubMed XML files, once,
    on one rank before the others build their streams from it (data/pubmed.py)."""
    if cfg.kind.records:  # instruction records are never PubMed citations
        return
    for src in cfg.data.sources:
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
    manifest = {}
    for src in cfg.data.sources:
        entries = []
        for path in of_source(src, records=cfg.kind.records).files:
            stat = os.stat(path)
            entries.append(
                {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}
            )
        manifest[src.name] = entries
    return manifest
