"""The 8gb profile (QLoRA on one device, no DeepSpeed) on a tiny model: both entry points, the two-stage chain,
exact resume, the bf16 trap, the world-size refusal and the merge into the bf16 base.

bitsandbytes' CPU backend runs NF4 Linear4bit and (non-paged) PagedAdamW8bit, so this runs without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_e2e import REPO, interrupted_copy, losses, run
from test_tune_e2e import merge
from transformers import AutoModelForCausalLM, AutoTokenizer

from mellama_train.config import resolve
from mellama_train.lora import apply_lora, write_random_base
from mellama_train.model import build_model, count_params, load_tokenizer
from mellama_train.plan import count

bnb = pytest.importorskip("bitsandbytes")

# intermediate 192, not the tiny profile's 176: every 4-bit layer's shape is one that bitsandbytes' packed CPU
# layout also accepts (out_features % 32, in_features % 64), as real LLaMA shapes are; the last test covers 176.
TINY_ARCH = (
    "{vocab_size: 2048, hidden_size: 64, intermediate_size: 192, num_layers: 2, num_heads: 4,"
    " num_kv_heads: 2, max_position_embeddings: 512, rope_theta: 10000.0}"
)
PRETRAIN_RECIPE = f"""
model:
  init: random
  tokenizer: ${{sample_data}}/tokenizer
  arch: {TINY_ARCH}
data:
  seq_len: 128
  sources:
    - {{name: textbooks, paths: ["${{sample_data}}/pubmed/train/*"], eval_paths: ["${{sample_data}}/pubmed/heldout.jsonl"]}}
optim: {{lr: 3.0e-3}}
train: {{global_batch_size: 4, log_every: 1, eval_batches: 2}}
"""
TUNE_RECIPE = """
data:
  seq_len: 128
  sources:
    - {name: medqa, paths: ["${sample_data}/instruct/medinstruct_alpaca.jsonl"]}
optim: {lr: 3.0e-3}
train: {global_batch_size: 4, log_every: 1}
"""


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    (root / "pretrain.yaml").write_text(PRETRAIN_RECIPE)
    (root / "tune.yaml").write_text(TUNE_RECIPE)
    return {"pretrain": root / "pretrain.yaml", "tune": root / "tune.yaml"}


def entry(task: str, out: Path, recipe: Path, *args: str):
    cmd = [sys.executable, str(REPO / "launch" / f"{task}.py"), "--profile", "8gb", "--config", str(recipe)]
    return run([*cmd, "--output-dir", str(out), *args])


@pytest.fixture(scope="module")
def stage1(recipes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stage1") / "run"
    proc = entry(
        "pretrain", out, recipes["pretrain"], "--max-steps", "6", "--save-every", "3", "--ds", "x.json"
    )
    assert "--ds x.json is ignored" in proc.stderr
    return out


@pytest.mark.slow
def test_stage1_continued_pretraining_writes_an_adapter_and_no_merged_model(stage1):
    assert (stage1 / "adapter" / "adapter_model.safetensors").is_file() and not (stage1 / "final").exists()
    adapter = json.loads((stage1 / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.05)
    assert sorted(p.name for p in (stage1 / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    record = json.loads((stage1 / "run_record.json").read_text())
    assert record["config"]["train"]["backend"] == "single" and record["ds_config"] == {}
    assert record["config"]["model"]["quantization"] == "nf4"
    metrics = losses(stage1)
    assert sorted(metrics) == list(range(1, 7)) and metrics[6] < metrics[1]


@pytest.mark.slow
def test_stage2_tunes_the_stage1_adapter_further(stage1, recipes, tmp_path):
    out = tmp_path / "stage2"
    entry(
        "tune",
        out,
        recipes["tune"],
        "--base",
        str(stage1 / "base"),
        "--init-adapter",
        str(stage1 / "adapter"),
        "--max-steps",
        "3",
    )
    before = load_file(stage1 / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained further, same adapter shape
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(stage1 / "base")


@pytest.mark.slow
def test_init_adapter_starts_from_the_stage1_weights(stage1, recipes):
    cfg = resolve("8gb", recipe=str(recipes["tune"]), task="tune")
    cfg.model.path, cfg.model.init_adapter = str(stage1 / "base"), str(stage1 / "adapter")
    model = apply_lora(
        build_model(cfg, load_tokenizer_from(stage1 / "base"), device=torch.device("cpu")), cfg
    )
    saved = load_file(stage1 / "adapter" / "adapter_model.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(saved)
    for name, tensor in saved.items():
        live = next(p for n, p in trainable.items() if n.replace(".default", "") == name)
        assert torch.equal(live.detach().to(tensor.dtype), tensor)


def load_tokenizer_from(path: Path):
    return AutoTokenizer.from_pretrained(path)


def test_the_4bit_base_keeps_embeddings_and_head_in_bf16_and_trains_only_adapters(recipes, tmp_path):
    cfg = resolve("8gb", recipe=str(recipes["pretrain"]))
    tokenizer = load_tokenizer(cfg)
    write_random_base(cfg, tokenizer, tmp_path / "base")
    cfg.model.init, cfg.model.path = "pretrained", str(tmp_path / "base")
    model = apply_lora(build_model(cfg, tokenizer, device=torch.device("cpu")), cfg)
    base = model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantisation
    # The trap: prepare_model_for_kbit_training would make these fp32 (+2 GB on Llama-3-8B).
    assert (
        base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    )
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "lora" not in n} <= {
        torch.bfloat16,
        torch.uint8,
    }
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    # 4-bit parameters are counted at their real size (MFU), and the planner's counts match the real model.
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == count(cfg.model.arch, 16, cfg.lora.target_modules).lora
    assert count_params(base) - adapters == count(cfg.model.arch).total


@pytest.mark.slow
def test_single_backend_resume_reproduces_the_uninterrupted_losses(stage1, recipes, tmp_path):
    reference = losses(stage1)
    resumed = interrupted_copy(stage1, tmp_path / "resumed", 3, ["checkpoints/step_00000006", "adapter"])
    entry("pretrain", resumed, recipes["pretrain"], "--max-steps", "6", "--save-every", "3")
    after = losses(resumed)
    assert [after[s] for s in (4, 5, 6)] == [reference[s] for s in (4, 5, 6)]  # exactly
    a = load_file(stage1 / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def dry_run(task: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / f"{task}.py"), "--profile", "8gb", "--dry-run"]
    return subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_the_8gb_profile_refuses_several_ranks_and_says_what_to_use():
    refused = dry_run("tune", WORLD_SIZE="2")
    assert refused.returncode == 2
    assert "trains on one device but 2 ranks were started; run it without a launcher" in refused.stdout
    ok = dry_run("pretrain")  # without a recipe the dry-run still shows what the profile does
    assert ok.returncode == 0
    assert "LoRA r=16 alpha=32 dropout=0.05 on 7 module types of a 4-bit NF4 base (QLoRA)" in ok.stdout
    assert "paged_adamw_8bit; one device, no DeepSpeed; cutoff 1024 tokens" in ok.stdout


@pytest.mark.slow
def test_merge_folds_a_qlora_adapter_into_the_bf16_base(stage1, tmp_path):
    out = tmp_path / "merged"
    merge(stage1 / "adapter", out)
    merged = load_file(out / "model.safetensors")
    base = load_file(stage1 / "base" / "model.safetensors")
    adapter = load_file(stage1 / "adapter" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    a = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight"].float()
    b = adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight"].float()
    expected = (base[key].float() + (32 / 16) * b @ a).to(
        torch.bfloat16
    )  # the bf16 base, not a dequantised one
    assert merged[key].dtype == torch.bfloat16
    torch.testing.assert_close(merged[key].float(), expected.float(), atol=1e-2, rtol=0)
    assert (merged[key] != base[key]).any()
    assert AutoModelForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(chunk):
    from transformers import LlamaConfig

    from mellama_train.loss import forward_loss

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 300, (2, 24))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt
    labels[1, 20:] = -100  # padding
    batch = {
        "input_ids": ids,
        "position_ids": torch.arange(24).repeat(2, 1),
        "labels": labels,
        "source_ids": torch.tensor([[0] * 24, [1] * 24]),
    }
    results = []
    for chunk_tokens in (0, chunk):
        model.zero_grad()
        total, sums, counts = forward_loss(model, batch, 2, torch.device("cpu"), chunk_tokens)
        total.backward()
        results.append((total.detach(), sums, counts, [p.grad.clone() for p in model.parameters()]))
    (t0, s0, c0, g0), (t1, s1, c1, g1) = results
    torch.testing.assert_close(t1, t0)
    torch.testing.assert_close(s1, s0)
    assert torch.equal(c1, c0) and c0.tolist() == [14.0, 19.0]
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# Shapes of the tiny 4-bit model: 176 is LLaMA's 8/3 x hidden rounded to 16, a shape bitsandbytes' packed CPU
# layout refuses (out_features % 32, in_features % 64); 192 is the shape the tests above use.
@pytest.mark.parametrize("intermediate", [176, 192])
def test_nf4_layers_train_the_same_on_cpus_whose_bitsandbytes_packs_4bit_weights(
    intermediate, recipes, tmp_path, monkeypatch
):
    """On a CPU with AVX512-BF16 (AMD EPYC Genoa, Intel Sapphire Rapids), bitsandbytes repacks each NF4 weight
    for its fused CPU kernel the first time the layer runs in eval mode without gradients (our evaluation):
    on the tiny shapes that failed its assertion "N must be divisible by block_n", and the packed kernel has
    no backward for the training steps after the evaluation. Forcing bitsandbytes' CPU feature check on shows,
    on any CPU, what such a machine does: the weights stay unpacked, and the evaluation and the steps after it
    compute exactly what the step before it did."""
    if not hasattr(bnb.nn.modules, "has_avx512bf16"):
        pytest.skip("this bitsandbytes has no packed CPU path")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # read when a Linear4bit is built
    assert bnb.nn.Linear4bit(64, 32).support_avx512bf16_for_cpu  # the forcing reaches bitsandbytes' check
    cfg = resolve(
        "8gb",
        recipe=str(recipes["pretrain"]),
        overrides=[f"model.arch.intermediate_size={intermediate}", "lora.dropout=0.0"],
    )
    tokenizer = load_tokenizer(cfg)
    write_random_base(cfg, tokenizer, tmp_path / "base")
    cfg.model.init, cfg.model.path = "pretrained", str(tmp_path / "base")
    model = apply_lora(build_model(cfg, tokenizer, device=torch.device("cpu")), cfg)
    ids = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    # LoRA B starts at zero; give the adapters values so that every gradient path carries signal.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))

    def train_step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads

    logits_before, grads_before = train_step()
    model.eval()
    with torch.no_grad():  # the evaluation: where bitsandbytes packs
        logits_eval = model(input_ids=ids).logits
    logits_after, grads_after = train_step()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert torch.equal(logits_eval, logits_before)
    assert torch.equal(logits_after, logits_before)
    assert grads_after.keys() == grads_before.keys()
    for name, grad in grads_before.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grads_after[name], grad), name
