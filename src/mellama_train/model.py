"""LLaMA model construction (from a Hugging Face directory or a profile's shape), parameter groups for weight
decay, and the FLOP count behind MFU. The tokenizer is data/tokenizer.py's (re-exported here)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from mellama_train.config import Config
from mellama_train.data.tokenizer import load_tokenizer

__all__ = [
    "build_model",
    "count_params",
    "device_peak_flops",
    "flops_per_token",
    "load_tokenizer",
    "model_config",
    "param_groups",
]


def model_config(cfg: Config, vocab_size: int) -> Any:
    """The transformers config of the model to train: read from model.path, or built from model.arch."""
    if cfg.model.init == "pretrained":
        return AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    a = cfg.model.arch
    return LlamaConfig(
        vocab_size=max(a.vocab_size, vocab_size),
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads,
        max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=a.rms_norm_eps,
        rope_theta=a.rope_theta,
        tie_word_embeddings=False,  # LLaMA-2 keeps separate input embedding and output head
    )


def _nf4_config() -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantise the quantisation constants too: ~0.4 bit/param saved
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _keep_nf4_weights_unpacked(model: torch.nn.Module) -> None:
    """On a CPU with AVX512-BF16 (AMD EPYC Genoa, Intel Sapphire Rapids), bitsandbytes' fused CPU kernel (its
    PR #1804; 0.50.2 here) repacks a Linear4bit's weight the first time the layer runs in eval mode without
    gradients, which our evaluation does, and keeps it packed. That layout refuses shapes (it fails unless
    out_features % 32 == 0 and in_features % 64 == 0, e.g. the tiny models' 176) and its kernel registers no
    backward, so the training steps after an evaluation would not pass gradients through the frozen base.
    The dequantise-then-matmul path that bitsandbytes takes on every other CPU serves any shape and trains.
    Linear4bit.forward reads this flag before packing; older releases lack it and never pack; GPUs never do."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_model(
    cfg: Config, tokenizer: Any, for_training: bool = True, device: torch.device | None = None
) -> torch.nn.Module:
    """Build or load the model, inside the backend's `building_model()`: under ZeRO-3 each parameter is
    partitioned as it loads; on one device pass the `device` it yields, and with model.quantization nf4 the
    linear layers of the blocks load in 4 bit straight onto it.

    PEFT's `prepare_model_for_kbit_training` is deliberately not called: it casts every parameter that is not
    quantised to fp32, which for Llama-3-8B adds ~2 GB (embeddings and head, 128k x 4096 each). Here they stay
    in bf16 and frozen; what that function otherwise does (freeze the base, checkpointing) is done below and
    by PEFT, and non-reentrant checkpointing needs no input gradients."""
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    common: dict[str, Any] = {"attn_implementation": cfg.model.attn_implementation, "dtype": dtype}
    if cfg.model.init == "pretrained":
        if cfg.model.quantization == "nf4":
            common.update(quantization_config=_nf4_config(), device_map={"": str(device or "cpu")})
        # safetensors only: a pickled .bin can run code when loaded (validation refuses such a directory first).
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.path, trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True, **common
        )
        if cfg.model.quantization == "nf4":
            _keep_nf4_weights_unpacked(model)
    else:
        torch.manual_seed(cfg.train.seed)  # every rank draws the same initial weights
        model = AutoModelForCausalLM.from_config(model_config(cfg, len(tokenizer)), **common)
    if device is not None and cfg.model.quantization != "nf4":
        model = model.to(device)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size};"
            " use the tokenizer that belongs to the model"
        )
    if not for_training:
        return model
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with ZeRO-3's parameter gathering hooks and needs no input grads.
        # transformers 5.2x renamed the method (and its kwargs); older 5.x only has the gradient_ name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms and biases (1-D tensors) are left undecayed, as in LLaMA and Megatron."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Under ZeRO-3 a partitioned parameter's .shape is empty; ds_shape keeps its real shape.
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _numel(param: torch.Tensor) -> int:
    # ZeRO-3 partitions a parameter (ds_numel keeps its size); a 4-bit bitsandbytes parameter packs two
    # weights per byte (its quant_state keeps the real shape).
    if hasattr(param, "ds_numel"):
        return param.ds_numel
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def count_params(model: torch.nn.Module) -> int:
    return sum(_numel(p) for p in model.parameters())


def flops_per_token(hf_config: Any, n_params: int, seq_len: int, frozen_base: bool = False) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N for the matmuls (forward + backward) plus
    12 * layers * hidden * seq_len for attention scores and values. N excludes the input embedding,
    a lookup rather than a matmul. Recomputation from gradient checkpointing is not counted (MFU, not HFU).
    A frozen base (LoRA) computes no weight gradients: 4N (forward 2N + input gradients 2N); the adapters'
    own FLOPs are a fraction of a percent and left out."""
    n_matmul = n_params - hf_config.vocab_size * hf_config.hidden_size
    matmul = (4 if frozen_base else 6) * n_matmul
    return matmul + 12 * hf_config.num_hidden_layers * hf_config.hidden_size * seq_len


# Dense bf16 peak per device, for MFU. Extend as needed; unknown devices report no MFU rather than a wrong one.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
