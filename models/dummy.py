"""Synthetic FLUX pipelines: the real FluxPipeline class with random weights.

No weights can be downloaded everywhere this service must run (CI, air-gapped capacity tests), so
`dummy:*` model names build the genuine diffusers/transformers modules from a config:

- ``dummy:tiny``            a few-MB pipeline with FLUX's geometry (four-level VAE, 16 latent channels,
                            2x2 packing) that renders a 512² image on a CPU in well under a second;
- ``dummy:flux.1-dev``      the full FLUX.1-dev architecture (19+38 blocks, 24x128 heads, guidance embeds,
                            T5-XXL, CLIP-L, FLUX VAE), random weights;
- ``dummy:flux.1-schnell``  the same without guidance embeds and with schnell's scheduler.

Full-size models are created on the meta device and materialised tensor by tensor on the target device,
so a 17 B-parameter pipeline appears on a GPU in seconds and never needs a CPU copy. Weights are drawn
from a fixed seed: every worker of a deployment holds the same synthetic model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

DUMMY_PREFIX = "dummy:"
WEIGHT_SEED = 20241127


@dataclass(frozen=True)
class DummySpec:
    name: str
    transformer: dict
    vae: dict
    clip: dict
    t5: dict
    scheduler: dict
    default_steps: int
    default_guidance: float
    max_sequence_length: int
    full_size: bool


_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

_FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
)
_CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
_T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
    use_cache=False, dense_act_fn="gelu_new", is_gated_act=True,
)
_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)

SPECS: dict[str, DummySpec] = {
    "tiny": DummySpec(
        name="tiny",
        # Widths are multiples of 64 so that bitsandbytes' 4-bit blocks (64 values) tile every layer.
        transformer=dict(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        vae=dict(
            _FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=512,
        ),
        clip=dict(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        ),
        t5=dict(
            vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False,
            dense_act_fn="gelu_new", is_gated_act=True,
        ),
        scheduler=_DEV_SCHEDULER,
        default_steps=4,
        default_guidance=3.5,
        max_sequence_length=64,
        full_size=False,
    ),
    "flux.1-dev": DummySpec(
        name="flux.1-dev", transformer=dict(_FLUX_TRANSFORMER, guidance_embeds=True), vae=_FLUX_VAE, clip=_CLIP_L,
        t5=_T5_XXL, scheduler=_DEV_SCHEDULER, default_steps=28, default_guidance=3.5, max_sequence_length=512,
        full_size=True,
    ),
    "flux.1-schnell": DummySpec(
        name="flux.1-schnell", transformer=dict(_FLUX_TRANSFORMER, guidance_embeds=False), vae=_FLUX_VAE,
        clip=_CLIP_L, t5=_T5_XXL, scheduler=_SCHNELL_SCHEDULER, default_steps=4, default_guidance=0.0,
        max_sequence_length=256, full_size=True,
    ),
}


def is_dummy(model: str) -> bool:
    return model.startswith(DUMMY_PREFIX)


def dummy_spec(model: str) -> DummySpec:
    name = model[len(DUMMY_PREFIX):]
    if name not in SPECS:
        raise ValueError(f"unknown synthetic model {model!r}; choose one of " +
                         ", ".join(DUMMY_PREFIX + k for k in SPECS))
    return SPECS[name]


def _byte_level_tokenizer(model_max_length: int, bos: str | None, eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer built in memory: 256 byte tokens plus specials, no merges, no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [t for t in (pad, eos, bos) if t]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, bos_token=bos, eos_token=eos, pad_token=pad,
    )


def build_tokenizers(spec: DummySpec) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    clip_tok = _byte_level_tokenizer(77, "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    t5_tok = _byte_level_tokenizer(spec.max_sequence_length, None, "</s>", "<pad>")
    return clip_tok, t5_tok


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _init_tensor_(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Draw one synthetic tensor: normal(0, 0.02) weights, unit norm scales, zero biases."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        tensor.zero_()
    elif tensor.ndim == 1 and ("norm" in name or leaf in ("weight", "scale")):
        tensor.fill_(1.0)
    elif tensor.is_floating_point():
        tensor.normal_(0.0, 0.02, generator=generator)
    else:
        tensor.zero_()


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                replace_linear: Callable[[str, torch.nn.Linear], torch.nn.Module | None] | None = None,
                seed: int = WEIGHT_SEED) -> torch.nn.Module:
    """Turn a module built on the meta device into random weights on `device`, one tensor at a time.

    `replace_linear(name, linear)` may return a substitute (a quantized layer) for a Linear as soon as its
    weight exists on the device: each layer is quantized before the next is drawn, so peak memory stays at
    the quantized size plus one bf16 layer.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}  # tied parameters (T5's shared embedding) stay tied

    def fill(mod: torch.nn.Module, prefix: str) -> None:
        for p_name, param in list(mod.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            if id(param) not in made:
                data = torch.empty(param.shape, device=device,
                                   dtype=dtype if param.is_floating_point() else param.dtype)
                _init_tensor_(f"{prefix}{p_name}", data, generator)
                made[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            setattr(mod, p_name, made[id(param)])
        for b_name, buf in list(mod.named_buffers(recurse=False)):
            if buf.device.type == "meta":
                mod.register_buffer(b_name, torch.zeros(buf.shape, device=device, dtype=buf.dtype))
            elif buf.device != device:
                mod.register_buffer(b_name, buf.to(device))

    # Depth-first, children before the parent's swap; iterative, so no closure cycle keeps tensors alive.
    seen: set[int] = {id(module)}
    stack: list[tuple[torch.nn.Module, str, torch.nn.Module | None, str, bool]] = [(module, "", None, "", False)]
    while stack:
        mod, prefix, parent, attr, expanded = stack.pop()
        if not expanded:
            fill(mod, prefix)
            stack.append((mod, prefix, parent, attr, True))
            for child_name, child in reversed(list(mod.named_children())):
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append((child, f"{prefix}{child_name}.", mod, child_name, False))
            continue
        if replace_linear is not None and parent is not None and type(mod) is torch.nn.Linear:
            new = replace_linear(prefix[:-1], mod)
            if new is not None:
                setattr(parent, attr, new)
                # drop the full-precision tensors now: peak memory is one layer, not the whole model
                for key in [k for k, v in made.items() if v is mod.weight or v is mod.bias]:
                    del made[key]
                mod.weight = None
                mod.bias = None
    made.clear()
    return module


def swap_linears(module: torch.nn.Module, replace: Callable[[str, torch.nn.Linear], torch.nn.Module | None]) -> int:
    """Replace every nn.Linear for which `replace` returns a module; returns how many were swapped."""
    swapped = 0
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                new = replace(full, child)
                if new is not None:
                    setattr(parent, child_name, new)
                    swapped += 1
    return swapped


def build_dummy_pipeline(model: str, device: torch.device, dtype: torch.dtype,
                         quantize: Callable[[str, str, torch.nn.Linear], torch.nn.Module | None] | None = None):
    """Build a FluxPipeline with synthetic weights directly on `device`.

    `quantize(component, name, linear)` lets the precision layer swap Linear layers as they are created.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    spec = dummy_spec(model)
    clip_tok, t5_tok = build_tokenizers(spec)
    clip_cfg = CLIPTextConfig(**spec.clip, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                              pad_token_id=clip_tok.pad_token_id)
    t5_cfg = T5Config(**spec.t5, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                      decoder_start_token_id=t5_tok.pad_token_id)

    def quant_hook(component: str):
        if quantize is None:
            return None
        return lambda name, linear: quantize(component, name, linear)

    with init_empty_weights(include_buffers=False), _default_dtype(dtype):
        transformer = FluxTransformer2DModel(**spec.transformer)
        text_encoder = CLIPTextModel(clip_cfg)
        text_encoder_2 = T5EncoderModel(t5_cfg)
        vae = AutoencoderKL(**spec.vae)
    text_encoder_2.tie_weights()  # one embedding table for `shared` and `encoder.embed_tokens`, as loaded
    components = {}
    for offset, (name, mod) in enumerate(
            [("transformer", transformer), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2),
             ("vae", vae)]):
        materialize(mod, device, dtype, replace_linear=quant_hook(name), seed=WEIGHT_SEED + offset)
        mod.eval().requires_grad_(False)
        components[name] = mod
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    pipe = FluxPipeline(scheduler=scheduler, tokenizer=clip_tok, tokenizer_2=t5_tok, **components)
    return pipe, spec
