"""Build the training data stream of one rank from the config: sources -> mixture -> packed micro-batches."""

from __future__ import annotations

import os
from typing import Any

from mellama_train.config import Config
from mellama_train.data.mixture import Mixture
from mellama_train.data.packing import PackedBatches
from mellama_train.data.readers import expand_paths
from mellama_train.data.source import SourceStream


def make_encoder(tokenizer: Any):
    """Text -> token ids without special tokens: the source stream adds BOS/EOS around each document itself."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return encode


def build_train_batches(cfg: Config, tokenizer: Any, rank: int, world_size: int) -> PackedBatches:
    encode = make_encoder(tokenizer)
    streams = [
        SourceStream(
            src, encode, tokenizer.bos_token_id, tokenizer.eos_token_id, rank, world_size, cfg.data.seed
        )
        for src in cfg.data.sources
    ]
    mixture = Mixture(streams, [src.weight for src in cfg.data.sources])
    return PackedBatches(mixture, cfg.data.seq_len, cfg.train.micro_batch_size)


def data_manifest(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """Files of every source with size and modification time, for the run record (what exactly was read)."""
    manifest = {}
    for src in cfg.data.sources:
        entries = []
        for path in expand_paths(src.paths, src.name):
            stat = os.stat(path)
            entries.append(
                {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}
            )
        manifest[src.name] = entries
    return manifest
