"""LoRA adapter files for tests and benchmarks, made with PEFT on the transformer they are meant for.

`peft_adapter` trains nothing: it adds a PEFT LoRA to a copy of the transformer's geometry, draws lora_B at
random (PEFT initialises it to zero, which would change nothing), and saves it in diffusers' format
(`transformer.<module>.lora_A.weight`). `kohya_adapter` writes the same kind of file with kohya/BFL keys
(`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`), the format most community FLUX LoRAs use.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_out")


def peft_adapter(transformer: torch.nn.Module, path: Path, rank: int = 4, seed: int = 0, std: float = 0.5,
                 targets=DEFAULT_TARGETS) -> Path:
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(transformer).to("cpu", torch.float32)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in get_peft_model_state_dict(model).items():
        if "lora_B" in key:
            value = torch.randn(value.shape, generator=gen) * std
        state["transformer." + key] = value.contiguous()
    save_file(state, str(path))
    del model
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
