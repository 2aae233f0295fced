"""FLOP model of the FLUX transformer, read off the model's own layers.

The denoising transformer is where the time goes and what bounds it, so it is the only part counted
(text encoders and the VAE are left out; the phase profile shows their share). Per denoising step of one
image with S = image tokens + text tokens:

- linear layers: 2 FLOP per weight per token they act on. Image-stream weights of the double blocks act on
  image tokens, text-stream weights on text tokens, single-block weights on both; the modulation layers
  and the time/guidance/pooled-text embedders act once per image, not per token.
- attention: QK^T and PV, 2*S^2*D each, so 4*S^2*D per block (D = heads x head_dim).

For FLUX.1-dev at 1024² (4096 image + 512 text tokens) this gives ~74 TFLOP per step, ~2.08 PFLOP for 28.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

# Double-block layers that belong to the text ("context") stream; everything else there is image stream.
_TEXT_STREAM_KEYS = (".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out", ".to_added_qkv", ".ff_context.")
# Layers that produce per-image modulation or conditioning vectors.
_PER_IMAGE_KEYS = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")


@dataclass(frozen=True)
class TransformerShape:
    """Weights of the transformer's linear layers, grouped by the tokens they act on."""
    image_params: int      # act on image tokens only
    text_params: int       # act on text tokens only
    all_params: int        # act on every token
    per_image_params: int  # act once per image
    attention_blocks: int
    inner_dim: int         # heads x head_dim

    @property
    def per_token_params(self) -> int:
        """Weights one token meets on its way through (the figure PERF.md calls ~6.44 B for FLUX.1-dev)."""
        return max(self.image_params, self.text_params) + self.all_params

    def as_dict(self) -> dict:
        return dict(asdict(self), per_token_params=self.per_token_params)


def _role(name: str) -> str:
    if name.startswith("time_text_embed.") or name.endswith(_PER_IMAGE_KEYS):
        return "per_image"
    if name == "context_embedder":
        return "text"
    if name in ("x_embedder", "proj_out"):
        return "image"
    if name.startswith("transformer_blocks."):
        return "text" if any(key in name for key in _TEXT_STREAM_KEYS) else "image"
    return "all"


def transformer_shape(transformer) -> TransformerShape:
    """Walk the nn.Linear layers (bitsandbytes and torchao layers are nn.Linear too) and sort their weights."""
    import torch

    sums = {"image": 0, "text": 0, "all": 0, "per_image": 0}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            sums[_role(name)] += module.in_features * module.out_features
    cfg = transformer.config
    return TransformerShape(
        image_params=sums["image"], text_params=sums["text"], all_params=sums["all"],
        per_image_params=sums["per_image"],
        attention_blocks=int(cfg.num_layers) + int(cfg.num_single_layers),
        inner_dim=int(cfg.num_attention_heads) * int(cfg.attention_head_dim),
    )


def shape_from_config(config: dict) -> TransformerShape:
    """The same figures from a transformer config alone: the model is built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    keys = set(inspect.signature(FluxTransformer2DModel.__init__).parameters)
    with init_empty_weights():
        model = FluxTransformer2DModel(**{k: v for k, v in dict(config).items() if k in keys})
    return transformer_shape(model)


def image_tokens(width: int, height: int, vae_scale_factor: int = 8) -> int:
    """FLUX packs 2x2 latent pixels into one token: 16 image pixels per token side with the 8x VAE."""
    side = vae_scale_factor * 2
    return (width // side) * (height // side)


def flop_per_step(shape: TransformerShape, width: int, height: int, text_tokens: int,
                  vae_scale_factor: int = 8) -> dict:
    """FLOP of one transformer call for one image, split into linear and attention."""
    img = image_tokens(width, height, vae_scale_factor)
    seq = img + text_tokens
    linear = 2 * (shape.image_params * img + shape.text_params * text_tokens + shape.all_params * seq
                  + shape.per_image_params)
    attention = 4 * seq * seq * shape.inner_dim * shape.attention_blocks
    return {"image_tokens": img, "text_tokens": text_tokens, "linear": linear, "attention": attention,
            "total": linear + attention}


def flop_per_image(shape: TransformerShape, width: int, height: int, steps: int, text_tokens: int,
                   vae_scale_factor: int = 8) -> float:
    return steps * flop_per_step(shape, width, height, text_tokens, vae_scale_factor)["total"]
