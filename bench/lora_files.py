"""Synthetic LoRA adapter files, made with PEFT for a given FLUX transformer (tests and bench/lora.py).

`peft_adapter` builds the transformer's skeleton on the meta device (no weights, so a full-size FLUX.1-dev costs
nothing), lets PEFT add a LoRA to it, and saves PEFT's state dict with random values in diffusers' format
(`transformer.<module>.lora_A.weight`). lora_B is random (PEFT initialises it to zero, which would change nothing).
`kohya_adapter` writes the kohya/BFL key format most community FLUX LoRAs use
(`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_out")
# What FLUX LoRA trainers commonly target besides attention: the MLPs and the modulation of every block
WIDE_TARGETS = DEFAULT_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
                                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")


def peft_adapter(transformer: torch.nn.Module, path: Path, rank: int = 4, seed: int = 0, std: float = 0.5,
                 targets=DEFAULT_TARGETS, dtype: torch.dtype = torch.float32) -> Path:
    from peft import LoraConfig, get_peft_model_state_dict

    with torch.device("meta"):
        skeleton = type(transformer).from_config(transformer.config)
    skeleton.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                    init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in get_peft_model_state_dict(skeleton).items():
        shape = tuple(value.shape)
        if "lora_B" in key:
            tensor = torch.randn(shape, generator=gen) * std
        else:  # lora_A: unit variance of the product for unit inputs
            tensor = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        state["transformer." + key] = tensor.to(dtype).contiguous()
    save_file(state, str(path))
    return path


def kohya_adapter(transformer: torch.nn.Module, path: Path, rank: int = 4, seed: int = 0, std: float = 5.0) -> Path:
    """Kohya/BFL keys for the first double and single block: fused img/txt qkv, attention outputs, linear2."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "lora_unet_double_blocks_0_img_attn_qkv": (inner, 3 * inner),
        "lora_unet_double_blocks_0_img_attn_proj": (inner, inner),
        "lora_unet_double_blocks_0_txt_attn_qkv": (inner, 3 * inner),
        "lora_unet_single_blocks_0_linear2": (inner + mlp, inner),
    }
    state = {}
    for prefix, (in_f, out_f) in shapes.items():
        state[f"{prefix}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        state[f"{prefix}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * std
        state[f"{prefix}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path
