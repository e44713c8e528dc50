"""The tokenizer a run trains with: the data side needs it to encode documents, the model side to size the
vocabulary, so it lives here, below both."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from mellama_train.config import Config


def load_tokenizer(cfg: Config) -> Any:
    path = cfg.model.tokenizer or cfg.model.path
    # transformers 5 builds a LLaMA tokenizer from `tokenizer.model` only through from_pretrained(dir);
    # constructing LlamaTokenizer(vocab_file=...) directly silently yields an empty vocabulary.
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"model.tokenizer: {path} defines no EOS token; documents could not be separated")
    return tok
