"""Text -> token ids, as every path encodes it: the streaming reader, `prepare` and `data inspect`."""

from __future__ import annotations

from typing import Any

from mellama_train.data.cleaners import get_cleaner
from mellama_train.data.files import Skip


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
