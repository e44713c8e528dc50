"""Hugging Face Hub ids as model paths, through the local Hugging Face cache only.

Clusters pre-download models into the Hugging Face cache (`hf download meta-llama/Llama-2-13b-hf`, HF_HOME /
HF_HUB_CACHE) and every peer (HF Trainer, LLaMA-Factory, axolotl) accepts `meta-llama/Llama-2-13b-hf`
where a directory is expected. Here a Hub id resolves to its snapshot directory in that cache at config time;
nothing is ever downloaded (local_files_only): a training start on 512 ranks must not fetch 26 GB 512 times, and
compute nodes rarely reach the Hub. A model missing from the cache is a one-line error naming the download.

The id is recovered from the snapshot path wherever it is needed (the adapter's base_model_name_or_path, the
model card's base_model), so the config holds one path, the directory actually read.
"""

from __future__ import annotations

import re
from pathlib import Path

# org/name: what a Hub model id looks like (huggingface_hub's own rule, without the length limit).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# <cache>/models--<org>--<name>/snapshots/<revision>[/file]: how huggingface_hub lays out a cached repo.
_SNAPSHOT = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/[^/]+(?:/|$)")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not Path(path).exists()


def local_path(path: str | None) -> str | None:
    """`path` itself when it exists or is no Hub id; a cached Hub id's snapshot directory; else `path` unchanged
    (preflight then says how to download it: missing_message)."""
    if not path or not looks_like_hub_id(path):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id=path, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return path


def hub_id(path: str | Path | None, kind: str = "models") -> str | None:
    """The Hub id of a path in the Hugging Face cache (a resolved model.path: `kind` models; a data file in a
    cached dataset: datasets), else None."""
    if not path:
        return None
    found = _SNAPSHOT.search(Path(path).as_posix())
    return f"{found.group(2)}/{found.group(3)}" if found and found.group(1) == kind else None


def missing_message(field: str, path: str) -> str:
    """The error for a model path that is neither a directory here nor a cached Hub id."""
    from huggingface_hub import constants

    return (
        f"{field}: {path} is not a directory here, and not a model in the Hugging Face cache"
        f" ({constants.HF_HUB_CACHE}); download it where there is network (`hf download {path}`, with"
        " HF_HOME pointing at the cache the nodes share) or give the model's directory"
    )
