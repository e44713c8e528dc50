"""The memory planner: its arithmetic against a hand-computed case, the 8 GB verdicts the profile promises,
DeepSpeed's estimator for ZeRO-3, and the start-up refusal of a run that cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_e2e import REPO

from mellama_train.config import ArchConfig, resolve
from mellama_train.plan import GIB, count, make_plan, plan_single
from mellama_train.preflight import validate

SMALL = ArchConfig(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
)


def test_single_gpu_plan_matches_a_hand_computed_case():
    cfg = resolve("8gb", task="tune", overrides=["lora.r=4", "data.seq_len=32", "train.loss_chunk_tokens=16"])
    c = count(SMALL, 4, cfg.lora.target_modules)
    # per block: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128 = 36,864; two blocks
    assert c.block_linear == 73_728 and c.embed == c.head == 64_000 and c.norms == 5 * 64
    # LoRA r=4: r x (in + out) per module: 4 x (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4,096 per block
    assert c.lora == 8_192
    rows = {what: nbytes for what, nbytes, _ in plan_single(cfg, SMALL, 8).rows}
    assert rows == {
        "block weights (NF4)": 38_034,  # 73,728 x (4 + 8/64 + 32/16384) bits / 8
        "dequantised weight (transient)": 16_384,  # 64 x 128 x 2 B
        "embeddings + head + norms": 256_640,  # (64,000 + 64,000 + 320) x 2 B, bf16
        "adapters: weights + grads + optimizer": 81_920,  # 8,192 x (4 + 4 + 2) B
        "activations: block inputs": 8_192,  # 2 layers x 32 tokens x 64 x 2 B
        "activations: one block recomputed": 61_440,  # 32 x 2 B x (6x64 + 2x32 + 4x128)
        "activations: adapter inputs": 32_768,  # 32 x 2 B x (6x64 + 128)
        "output layer + loss": 128_000,  # 16-token chunk x 1,000 x (4 + 4) B
    }
    assert plan_single(cfg, SMALL, 8).peak == 623_378


def test_llama3_8b_fits_8gb_and_llama2_13b_does_not():
    cfg = resolve("8gb", task="tune")
    fits = make_plan(cfg)  # the profile's reference shape: Llama-3-8B
    assert fits.fits and 6.0 * GIB < fits.peak <= 7.0 * GIB, fits.peak / GIB
    too_big = make_plan(cfg, model="llama2-13b")
    assert not too_big.fits
    assert too_big.advice == [
        "to fit: a 7B/8B model (this one has 13.0B parameters), or data.seq_len below 1024, or lora.r below 16"
    ]
    # The bf16 trap, in numbers: fp32 embeddings and head would cost Llama-3-8B another 2 x 128,256 x 4,096 x 2 B.
    rows = {what: nbytes for what, nbytes, _ in fits.rows}
    assert rows["embeddings + head + norms"] == pytest.approx(2 * 128_256 * 4096 * 2, rel=1e-3)


def test_zero3_model_states_come_from_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = resolve("70b")
    plan = make_plan(cfg, gpus=64, gpus_per_node=8, gpu_gib=80)
    c = count(cfg.model.arch)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(c.total, c.largest_module, 8, 8, False, False, True)
    assert plan.rows[0][1] == gpu == 4 * c.largest_module + int(18 * c.total / 64)
    assert plan.fits
    small = make_plan(cfg, gpus=16, gpus_per_node=8, gpu_gib=80)
    assert not small.fits and small.advice[0].startswith("to fit: 24 GPUs (3 nodes of 8)")
    assert make_plan(cfg, gpus=24, gpus_per_node=8, gpu_gib=80).fits  # the advice holds
    disk = dict(plan.disk)
    assert disk["per checkpoint (bf16 params + fp32 master + Adam)"] == c.total * 14


def test_start_up_refuses_a_model_predicted_not_to_fit(tmp_path):
    model = tmp_path / "llama2-13b"
    model.mkdir()
    config = {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40}
    config.update(num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)
    (model / "config.json").write_text(json.dumps(config))
    cfg = resolve("8gb", task="tune", overrides=[f"model.path={model}"])
    problems, _ = validate(cfg)
    assert any(p.startswith("predicted peak 8.") and "a 7B/8B model" in p for p in problems), problems
    proc = subprocess.run(
        [sys.executable, "-m", "mellama_train", "plan", "--task", "tune", "--model", str(model)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "DOES NOT FIT in 7.00 GiB" in proc.stdout
