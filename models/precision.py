"""Numeric precision of a pipeline: bf16, fp4 (bitsandbytes 4-bit) and fp8 (torchao, Hopper and newer).

bf16  every module in bfloat16 (float32 on a CPU, where bf16 kernels are slow or missing).
fp4   every nn.Linear of the transformer, T5 and CLIP becomes a bitsandbytes Linear4bit (fp4, bf16 compute),
      except T5's feed-forward output `wo`: 4-bit there makes T5 cast activations to the weight's storage
      dtype (uint8) and crash. `wo` becomes LLM.int8 (Linear8bitLt) instead, the one quantized dtype T5's
      feed-forward is written to accept; in bf16 it alone would cost 1.9 GiB and push the full FLUX.1-dev
      past 9 GiB. The swap works on CPU as well. Layers are quantized as their weights reach the device,
      so loading never needs the bf16 copy there.
fp8   torchao float8 dynamic activations + float8 weights, row-wise scales, on the transformer: about twice
      the matrix rate of bf16 on H100 when compiled (uncompiled it is slower than bf16). Lossy: opt-in.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp4", "fp8")
FP4_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder")


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "fp8 needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"fp8 needs compute capability 8.9 or newer (Ada/Hopper); this GPU has {major}.{minor}"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False, "fp8 needs the torchao package"
    return True, ""


def make_fp4_linear(linear: torch.nn.Linear, device: torch.device, dtype: torch.dtype,
                    quant_type: str = "fp4") -> torch.nn.Module:
    """One bitsandbytes 4-bit layer from an nn.Linear; quantized as it moves onto `device`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, quant_type=quant_type, device="meta")
    weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False, quant_type=quant_type)
    layer.weight = weight.to(device)  # Params4bit quantizes on its first move to a real device
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device=device, dtype=dtype), requires_grad=False)
    return layer


def make_int8_linear(linear: torch.nn.Linear, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """LLM.int8 layer (outliers above 6 sigma kept in 16-bit), quantized as it moves onto `device`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
    weight = bnb.nn.Int8Params(linear.weight.data.to(dtype), requires_grad=False, has_fp16_weights=False)
    # Int8Params.to() only quantizes on a move out of host memory; a synthetic weight drawn on the GPU is
    # already there, so quantize explicitly (the same call .to() makes).
    layer.weight = weight._quantize(device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device=device, dtype=dtype), requires_grad=False)
    return layer


def fp4_replacer(device: torch.device, dtype: torch.dtype, quant_type: str = "fp4"):
    """A `quantize(component, name, linear)` hook for the loaders: which layers become 4-bit."""

    def quantize(component: str, name: str, linear: torch.nn.Linear):
        if component not in FP4_COMPONENTS:
            return None
        if component == "text_encoder_2" and name.endswith(".wo"):
            return make_int8_linear(linear, device, dtype)
        return make_fp4_linear(linear, device, dtype, quant_type)

    return quantize


def use_expandable_segments() -> None:
    """Let the caching allocator grow segments in place instead of keeping whole freed blocks: the low-memory
    mode's point is its footprint on the card, and with fixed segments the card showed 12.8 GiB in use while
    serving 1024² although torch held 8.98 GiB (10.74 GiB peak). Other PYTORCH_CUDA_ALLOC_CONF options stay."""
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as exc:  # an older torch or another allocator backend
        log.warning("expandable segments not available: %s", exc)


def apply_fp8(transformer: torch.nn.Module, skip_lora: bool = False) -> None:
    """With skip_lora, PEFT's LoRA matrices stay in bf16 (they are swapped in place and are tiny) and only the
    base Linears inside the LoRA layers become fp8."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    options = {}
    if skip_lora:
        options["filter_fn"] = lambda module, fqn: isinstance(module, torch.nn.Linear) and ".lora_" not in fqn
    # set_inductor_config=False: by default torchao switches on inductor's coordinate-descent tuning (checking
    # all directions) for the whole process. That tunes every generated kernel one candidate at a time on the
    # first call: measured 617 kernel benchmarks and 258 of the 283 s warm-up of one 1024² size on H200, while
    # compiling itself took 24 s. The quantization (the diffusers fp8 recipe) is the same either way.
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
              **options)
