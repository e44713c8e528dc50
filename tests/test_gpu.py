"""What a GPU changes, checked on one (`pytest -m gpu`; skipped without CUDA, so CI never runs them): bf16 against
fp32 losses, packed documents kept apart by every attention kernel there (SDPA, eager, FlashAttention-2 where
installed), and a ZeRO-3 save and resume through DeepSpeed's launcher that reproduces the losses.

MELLAMA_GPU_TESTS_ON_CPU=1 runs them on the CPU instead (FlashAttention-2 skipped), so the tests themselves are
known to work before a GPU is lent: `MELLAMA_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from test_train_e2e import LAUNCH, TINY, interrupted_copy, losses, run
from transformers import LlamaConfig, LlamaForCausalLM

ON_CPU = os.environ.get("MELLAMA_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HAS_FA2 = importlib.util.find_spec("flash_attn") is not None


def one_gpu(out: Path, *args: str, port: int = 29561) -> None:
    """A run of the tiny recipe on one GPU through DeepSpeed's launcher and the project's zero3.json."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=1", f"--master_port={port}"]
    command = [LAUNCH, "--ds", "ds_configs/zero3.json", "--output-dir", str(out), *TINY, *args]
    run([*launcher, *command], timeout=900)


def documents(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def mean_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Next-token loss of one document: its logits predict its own tokens 1..n-1."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:]).item()


KERNELS = [
    ("sdpa", torch.float32),
    ("sdpa", torch.bfloat16),
    ("eager", torch.float32),
    pytest.param(
        "flash_attention_2",
        torch.bfloat16,
        marks=pytest.mark.skipif(ON_CPU or not HAS_FA2, reason="flash_attn is not installed (or on CPU)"),
    ),
]


@pytest.mark.parametrize(("attn", "dtype"), KERNELS)
def test_packed_documents_get_the_loss_they_get_alone(attn, dtype):
    """The trainer feeds packed rows with position_ids restarting at each document and no attention_mask
    (loss.py): every kernel must keep the documents apart, so each one's loss equals its loss alone."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_cache=False,  # as model.build_model sets it: with a KV cache transformers skips the packed mask
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).to(DEVICE).eval()
    docs = documents([37, 120, 8, 91], config.vocab_size)
    ids = torch.cat(docs)[None].to(DEVICE)
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None].to(DEVICE)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # relative, on the mean loss
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        unpositioned = model(input_ids=ids).logits[0]
        start = 0
        for d in docs:
            alone = model(input_ids=d[None].to(DEVICE)).logits[0]
            part = packed[start : start + len(d)]
            want, got = mean_loss(alone, d.to(DEVICE)), mean_loss(part, d.to(DEVICE))
            assert abs(got - want) <= tolerance * want, (attn, dtype, len(d), got, want)
            start += len(d)
        # Control: with 0..L-1 positions the second document sees the first, and its loss moves.
        second = slice(len(docs[0]), len(docs[0]) + len(docs[1]))
        alone = model(input_ids=docs[1][None].to(DEVICE)).logits[0]
        assert (unpositioned[second].float() - alone.float()).abs().max() > 1e-2


def test_bf16_losses_follow_fp32_losses(tmp_path):
    """The same 8 steps in bf16 (the recipe) and fp32 on one GPU: every loss within 2% of fp32's, both falling."""
    one_gpu(tmp_path / "bf16", "--max-steps", "8", "--set", "train.precision=bf16")
    one_gpu(tmp_path / "fp32", "--max-steps", "8", "--set", "train.precision=fp32", port=29562)
    bf16, fp32 = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert sorted(bf16) == sorted(fp32) == list(range(1, 9))
    for step in fp32:
        assert abs(bf16[step] - fp32[step]) <= 0.02 * fp32[step], (step, bf16[step], fp32[step])
    assert bf16[8] < bf16[1] and fp32[8] < fp32[1]


def test_a_zero3_checkpoint_on_gpu_resumes_to_the_same_losses(tmp_path):
    """8 steps saving at 4; a copy cut back to step 4 resumes and trains steps 5-8 to the uninterrupted losses.
    Not bit-equal on a GPU: attention's backward kernels sum in a varying order; 1e-4 relative is far below
    what a wrong state (optimizer moments, lr schedule, data position) would give."""
    full = tmp_path / "full"
    one_gpu(full, "--max-steps", "8", "--save-every", "4")
    resumed = interrupted_copy(full, tmp_path / "resumed", 4, ["checkpoints/step_00000008", "final"])
    one_gpu(resumed, "--max-steps", "8", "--save-every", "4", port=29563)
    want, got = losses(full), losses(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(got[step] - want[step]) <= 1e-4 * want[step], (step, got[step], want[step])
