"""What content digests cost a checkpoint save and a resume (src/mellama_train/integrity.py, checkpoint.py).

CPU only, one rank, ZeRO-3 through the project's Engine. Builds a LLaMA of the given shape (random weights),
takes one optimizer step so the Adam moments exist, then saves the same state repeatedly, alternating:

    deepspeed     DeepSpeed's own save_checkpoint with its TorchCheckpointEngine (torch.save to a path, no fsync)
    no_digest     our save path (checkpoint.save: files through a file object, fsynced, rank file, manifest,
                  rename) with the hashing replaced by a plain write: what the save costs without digests
    ours          checkpoint.save as shipped: every file hashed (SHA-256) while it is written

The digest's cost is ours / no_digest - 1 (the goal: at most 5% of the save's wall time). The resume side:
checkpoint.verify(deep=True) (every byte hashed again, then safe unpickling of the pickles) against DeepSpeed's
own load of the same checkpoint.

    python bench/checkpoint_digest.py --workdir /tmp/ckbench                    # ~200M parameters, ~3.3 GB saves
    python bench/checkpoint_digest.py --workdir /tmp/x --hidden 256 --layers 2   # a quick one

This machine writes into its page cache: writes are far faster than on the shared filesystems of clusters, so
the digest's share here is an upper bound of what a cluster sees (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mellama_train import checkpoint, integrity  # noqa: E402
from mellama_train.backends import collectives  # noqa: E402
from mellama_train.backends.deepspeed import engine, files  # noqa: E402
from mellama_train.config import resolve  # noqa: E402
from mellama_train.ds_config import resolve_ds_config  # noqa: E402
from mellama_train.model import build_model, load_tokenizer, param_groups  # noqa: E402


class _Done:
    def __init__(self, digest):
        self.digest = digest

    def result(self):
        return self.digest


def plain_save_torch(obj, path):
    """integrity.save_torch without the hash: the same file object path and fsync."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return integrity.FileDigest(os.path.getsize(path), "0" * 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2752)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()

    heads = max(args.hidden // 128, 1)
    cfg = resolve(
        "tiny",
        overrides=[
            f"model.arch.hidden_size={args.hidden}",
            f"model.arch.num_layers={args.layers}",
            f"model.arch.intermediate_size={args.intermediate}",
            f"model.arch.num_heads={heads}",
            f"model.arch.num_kv_heads={heads}",
            "model.gradient_checkpointing=false",
            "train.global_batch_size=1",
            "train.micro_batch_size=1",
            "data.seq_len=32",
        ],
    )
    env = engine.init_distributed(10)
    tokenizer = load_tokenizer(cfg)
    ds_config = resolve_ds_config(cfg.train.ds_config, cfg)
    with engine.model_construction(ds_config):
        model = build_model(cfg, tokenizer)
    eng = engine.DeepSpeedBackend(model, ds_config, param_groups(model, 0.0), lambda step: 1.0, env)
    ids = torch.randint(0, len(tokenizer), (1, 32))
    out = eng(input_ids=ids, labels=ids)
    eng.backward(out.loss)
    eng.step()  # the Adam moments now exist, as in any checkpoint after step 1

    root = args.workdir / "checkpoints"
    shutil.rmtree(args.workdir, ignore_errors=True)
    root.mkdir(parents=True)
    times: dict[str, list[float]] = {"deepspeed": [], "no_digest": [], "ours": []}
    sizes: dict[str, int] = {}
    step = 0

    def ours(label: str) -> Path:
        nonlocal step
        step += 1
        state = checkpoint.TrainerState(step=step)
        t0 = time.perf_counter()
        path = checkpoint.save(eng, root, state, {}, env.rank, keep_last=1000)
        times[label].append(time.perf_counter() - t0)
        return path

    def deepspeed_save() -> None:  # its own checkpoint engine: torch.save(path)
        wrapper, inner = eng._ds.checkpoint_engine, eng._files._inner
        eng._ds.checkpoint_engine = inner
        t0 = time.perf_counter()
        eng._ds.save_checkpoint(str(root), tag="deepspeed", save_latest=False)
        times["deepspeed"].append(time.perf_counter() - t0)
        eng._ds.checkpoint_engine = wrapper
        shutil.rmtree(root / "deepspeed")

    def no_digest_save() -> None:
        real_pending = integrity.save_torch_pending
        integrity.save_torch_pending = lambda obj, path: _Done(plain_save_torch(obj, path))
        real = integrity.save_torch
        integrity.save_torch = plain_save_torch
        try:
            path = ours("no_digest")
        finally:
            integrity.save_torch, integrity.save_torch_pending = real, real_pending
        shutil.rmtree(path)

    def digest_save() -> None:
        nonlocal last
        path = ours("ours")
        sizes["ours"] = checkpoint._directory_bytes(path)
        t0 = time.perf_counter()
        problem = checkpoint.verify(path, deep=True, rank=0)
        times.setdefault("verify_deep", []).append(time.perf_counter() - t0)
        assert problem is None, problem
        t0 = time.perf_counter()
        for name in integrity_pt_files(path):
            files.safe_load(str(path / name), mmap=True)
        times.setdefault("safe_unpickle", []).append(time.perf_counter() - t0)
        if last is not None:
            shutil.rmtree(last)
        last = path

    last: Path | None = None
    rng = random.Random(0)
    for _ in range(args.pairs):  # a seeded order per round: what the previous save left dirty falls on each
        variants = [deepspeed_save, no_digest_save, digest_save]
        rng.shuffle(variants)
        for variant in variants:
            variant()

    t0 = time.perf_counter()
    eng.load(str(root), last.name)
    load_s = time.perf_counter() - t0

    gib = sizes["ours"] / 2**30
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"parameters {sum(p.ds_numel for p in model.parameters()) / 1e6:.0f}M, checkpoint {gib:.2f} GiB")
    for key, values in times.items():
        print(f"{key:14s} median {med[key]:7.2f} s   all {' '.join(f'{v:.2f}' for v in values)}")
    print(f"deepspeed load  {load_s:7.2f} s")
    print(f"digest cost: ours / no_digest = {med['ours'] / med['no_digest']:.3f} (ratio of medians)")
    print(f"ours / deepspeed's own save = {med['ours'] / med['deepspeed']:.3f}")
    print(
        f"resume check (verify deep + safe unpickle) / deepspeed load = "
        f"{(med['verify_deep'] + med['safe_unpickle']) / load_s:.3f}"
    )
    print(f"hash rate at resume: {gib / med['verify_deep']:.2f} GiB/s")
    collectives.shutdown()


def integrity_pt_files(path: Path) -> list[str]:
    return [p.name for p in path.glob("*.pt")]


if __name__ == "__main__":
    main()
