"""FluxEngine with the real FluxPipeline (dummy:tiny on CPU): bf16, fp4 layers, loading from a local folder."""
from __future__ import annotations

import io

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from models.flux import EngineConfig, EngineOutOfMemory, FluxEngine, GenerationInterrupted, ImageSpec
from tests.unit.support import OutOfMemoryPipe, PreloadedEngine


def spec(seed: int = 1, width: int = 256, height: int = 256, steps: int = 2, prompt: str = "a lighthouse") -> ImageSpec:
    return ImageSpec(prompt=prompt, seed=seed, width=width, height=height, steps=steps, guidance=3.5)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def linears(module: torch.nn.Module) -> dict[str, type]:
    """name -> class of every Linear-like layer (plain nn.Linear or bitsandbytes Linear4bit)."""
    return {name: type(m) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


# ---- bf16 -------------------------------------------------------------------------------------------
def test_bf16_engine_describes_the_synthetic_model(bf16_engine):
    info = bf16_engine.info
    assert info.model == "dummy:tiny"
    assert info.synthetic is True
    assert info.precision == "bf16"
    assert info.device == "cpu" and info.device_name == "cpu"
    assert info.dtype == "float32"  # bf16 becomes float32 on a CPU
    assert info.default_steps == 4
    assert type(bf16_engine.pipe).__name__ == "FluxPipeline"


def test_bf16_engine_has_no_quantized_layers_and_float32_weights(bf16_engine):
    pipe = bf16_engine.pipe
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, component)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()), component
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == {torch.float32}, (component, dtypes)


@pytest.mark.parametrize("precision", ["bf16", "fp4"])
def test_every_module_is_in_eval_mode(request, precision):
    pipe = request.getfixturevalue(f"{precision}_engine").pipe
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        training = [name for name, m in getattr(pipe, component).named_modules() if m.training]
        assert training == [], (component, training[:5])


@pytest.mark.parametrize("precision", ["bf16", "fp4"])
def test_generate_returns_one_image_of_the_requested_size_per_spec(request, precision):
    engine = request.getfixturevalue(f"{precision}_engine")
    images = engine.generate([spec(seed=1, width=320, height=256), spec(seed=2, width=320, height=256)])
    assert [im.size for im in images] == [(320, 256), (320, 256)]  # PIL: (width, height)
    first, second = (np.asarray(im) for im in images)
    assert first.std() > 1.0, "the image is flat: the pipeline did not render anything"
    assert not np.array_equal(first, second), "two seeds rendered the same image"


@pytest.mark.parametrize("precision", ["bf16", "fp4"])
def test_same_spec_renders_identical_pixels(request, precision):
    engine = request.getfixturevalue(f"{precision}_engine")
    a = engine.generate([spec(seed=42)])[0]
    b = engine.generate([spec(seed=42)])[0]
    c = engine.generate([spec(seed=43)])[0]
    assert png_bytes(a) == png_bytes(b)
    assert png_bytes(a) != png_bytes(c)


def test_a_batch_must_share_size_steps_and_guidance(bf16_engine):
    with pytest.raises(ValueError, match="batch"):
        bf16_engine.generate([spec(width=256), spec(width=512)])
    with pytest.raises(ValueError, match="batch"):
        bf16_engine.generate([spec(steps=2), spec(steps=3)])


def test_should_stop_interrupts_between_steps(bf16_engine):
    calls = []

    def should_stop(step, total):
        calls.append((step, total))
        return step == 2

    with pytest.raises(GenerationInterrupted):
        bf16_engine.generate([spec(steps=4)], should_stop)
    assert calls == [(1, 4), (2, 4)]
    assert bf16_engine.generate([spec(steps=1)])[0].size == (256, 256)  # the pipeline still works


def test_repeated_prompts_are_served_from_the_prompt_cache(bf16_engine):
    engine = PreloadedEngine(bf16_engine)
    engine.generate([spec(prompt="a quiet harbour", steps=1)])
    assert (engine.prompt_cache_hits, engine.prompt_cache_misses) == (0, 1)
    engine.generate([spec(prompt="a quiet harbour", steps=1, seed=5), spec(prompt="a loud market", steps=1)])
    assert (engine.prompt_cache_hits, engine.prompt_cache_misses) == (1, 2)


def test_out_of_memory_is_reported_memory_released_and_the_engine_recovers(bf16_engine, monkeypatch):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = OutOfMemoryPipe(bf16_engine.pipe, times=1)
    released = []
    monkeypatch.setattr(engine, "release_memory", lambda: released.append(True))
    with pytest.raises(EngineOutOfMemory, match="out of memory"):
        engine.generate([spec()])
    assert released == [True]
    assert engine.generate([spec()])[0].size == (256, 256)


# ---- fp4 --------------------------------------------------------------------------------------------
def test_fp4_transformer_linears_are_all_bitsandbytes_4bit(fp4_engine):
    layers = linears(fp4_engine.pipe.transformer)
    assert layers, "no linear layers found in the transformer"
    plain = [name for name, cls in layers.items() if cls is torch.nn.Linear]
    assert plain == []
    for name, module in fp4_engine.pipe.transformer.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            assert isinstance(weight, bnb.nn.Params4bit), name
            assert weight.quant_state is not None, f"{name} was never quantized"
            assert weight.quant_type == "fp4", name
            assert weight.dtype == torch.uint8, name  # packed 4-bit values, two per byte
            assert module.compute_dtype == torch.float32, name  # bf16 compute becomes float32 on a CPU


def test_fp4_t5_linears_are_4bit_except_the_feed_forward_output(fp4_engine):
    """4-bit `wo` makes T5 cast activations to uint8 and crash; it is LLM.int8 instead (models/precision.py)."""
    layers = linears(fp4_engine.pipe.text_encoder_2)
    wo = {name: cls for name, cls in layers.items() if name.endswith(".wo")}
    others = {name: cls for name, cls in layers.items() if not name.endswith(".wo")}
    assert others and set(others.values()) == {bnb.nn.Linear4bit}, others
    assert any(name.endswith(".SelfAttention.q") for name in others)
    assert wo and not any(issubclass(cls, bnb.nn.Linear4bit) for cls in wo.values()), wo
    assert set(wo.values()) == {bnb.nn.Linear8bitLt}, wo
    for name, module in fp4_engine.pipe.text_encoder_2.named_modules():
        if name.endswith(".wo"):
            assert module.weight.dtype == torch.int8, name


def test_fp4_quantizes_clip_and_leaves_the_vae_alone(fp4_engine):
    clip = linears(fp4_engine.pipe.text_encoder)
    assert clip and set(clip.values()) == {bnb.nn.Linear4bit}, clip
    vae_layers = [type(m) for m in fp4_engine.pipe.vae.modules()]
    assert not any(issubclass(cls, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for cls in vae_layers)


def test_fp4_renders_through_the_4bit_layers(bf16_engine, fp4_engine):
    """Same synthetic weights, same seed: only the 4-bit layers can make the images differ."""
    assert fp4_engine.info.precision == "fp4"
    bf16_image = np.asarray(bf16_engine.generate([spec(seed=9)])[0]).astype(np.int16)
    fp4_image = np.asarray(fp4_engine.generate([spec(seed=9)])[0]).astype(np.int16)
    assert bf16_image.shape == fp4_image.shape
    assert np.abs(bf16_image - fp4_image).mean() > 0.5


# ---- loading a local diffusers folder (FluxPipeline.from_pretrained) --------------------------------
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """dummy:tiny written the way diffusers writes any FLUX checkpoint (separate q/k/v, safetensors)."""
    from models.dummy import build_dummy_pipeline

    pipe, _ = build_dummy_pipeline("dummy:tiny", torch.device("cpu"), torch.float32)
    folder = tmp_path_factory.mktemp("flux-local")
    pipe.save_pretrained(folder)
    assert (folder / "model_index.json").is_file()
    return folder, pipe


def load_folder(folder, precision: str) -> FluxEngine:
    engine = FluxEngine(EngineConfig(model=str(folder), precision=precision, device="cpu",
                                     warmup_sizes=((256, 256),), warmup_steps=1))
    engine.load()
    return engine


def assert_same_weights(saved: dict, loaded: dict) -> None:
    """Every saved tensor is in the loaded model, or (q/k/v) inside a fused to_qkv / to_added_qkv."""
    fused = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
    covered = set()
    for key, value in loaded.items():
        prefix, _, leaf = key.rpartition(".")
        module_prefix, _, module = prefix.rpartition(".")
        if module in fused:
            parts = [f"{module_prefix}.{name}.{leaf}" for name in fused[module]]
            assert torch.equal(value, torch.cat([saved[p] for p in parts])), key
            covered.update(parts)
        elif key in saved:
            assert torch.equal(value, saved[key]), f"{key} differs from the saved weights"
            covered.add(key)
    assert covered == set(saved), sorted(set(saved) - covered)[:5]


@pytest.mark.slow
def test_bf16_loads_a_local_diffusers_folder(saved_pipeline):
    folder, original = saved_pipeline
    engine = load_folder(folder, "bf16")
    info = engine.info
    assert info.model == str(folder)
    assert info.synthetic is False
    assert info.precision == "bf16"
    assert (info.default_steps, info.default_guidance) == (28, 3.5)  # the tiny config has guidance embeds
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert_same_weights(getattr(original, component).state_dict(), getattr(engine.pipe, component).state_dict())
        assert not getattr(engine.pipe, component).training, component
    image = engine.generate([spec(steps=2)])[0]
    assert image.size == (256, 256)
    assert np.asarray(image).std() > 1.0


@pytest.mark.slow
def test_fp4_quantizes_a_local_diffusers_folder(saved_pipeline):
    folder, _ = saved_pipeline
    engine = load_folder(folder, "fp4")
    assert engine.info.synthetic is False and engine.info.precision == "fp4"
    transformer = linears(engine.pipe.transformer)
    assert set(transformer.values()) == {bnb.nn.Linear4bit}
    t5 = linears(engine.pipe.text_encoder_2)
    assert not any(issubclass(cls, bnb.nn.Linear4bit) for name, cls in t5.items() if name.endswith(".wo"))
    assert {cls for name, cls in t5.items() if not name.endswith(".wo")} == {bnb.nn.Linear4bit}
    assert all(m.weight.quant_state is not None for m in engine.pipe.transformer.modules()
               if isinstance(m, bnb.nn.Linear4bit))
    image = engine.generate([spec(steps=2)])[0]
    assert image.size == (256, 256)
    assert np.asarray(image).std() > 1.0


def test_a_missing_model_folder_fails_with_its_name(tmp_path):
    missing = tmp_path / "no-such-model"
    engine = FluxEngine(EngineConfig(model=str(missing), precision="bf16", device="cpu"))
    with pytest.raises(Exception) as caught:
        engine.load()
    assert str(missing) in str(caught.value)


def test_an_unknown_synthetic_model_is_refused():
    with pytest.raises(ValueError, match="dummy:tiny"):
        FluxEngine(EngineConfig(model="dummy:nope", device="cpu")).load()


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        FluxEngine(EngineConfig(model="dummy:tiny", precision="int3", device="cpu"))


def test_warmup_renders_each_size_then_a_full_batch(bf16_engine, monkeypatch):
    calls = []
    real_generate = bf16_engine.generate

    def recording_generate(specs, should_stop=None):
        calls.append([(s.width, s.height) for s in specs])
        return real_generate(specs, should_stop)

    monkeypatch.setattr(bf16_engine, "generate", recording_generate)
    monkeypatch.setattr(bf16_engine.config, "warmup_sizes", ((256, 256), (512, 256)))
    monkeypatch.setattr(bf16_engine.config, "warmup_batch", 3)
    monkeypatch.setattr(bf16_engine.config, "warmup_steps", 1)
    bf16_engine.warmup()
    assert calls == [[(256, 256)], [(512, 256)], [(512, 256)] * 3]


def test_fp8_without_a_capable_gpu_serves_bf16_and_says_why():
    engine = FluxEngine(EngineConfig(model="dummy:tiny", precision="fp8", device="cpu"))
    info = engine.load()
    assert info.precision == "bf16"
    assert any("fp8 is not available here" in note for note in info.notes), info.notes
    assert len(engine.generate([ImageSpec("a cat", 1, 256, 256, 1, 3.5)])) == 1


def test_an_unknown_attention_backend_is_refused_with_the_known_names():
    engine = FluxEngine(EngineConfig(model="dummy:tiny", device="cpu", attention_backend="fastest"))
    with pytest.raises(ValueError, match="unknown attention backend 'fastest'.*_native_cudnn"):
        engine.load()


def test_an_attention_backend_on_a_cpu_is_noted_and_the_engine_still_renders():
    engine = FluxEngine(EngineConfig(model="dummy:tiny", device="cpu", attention_backend="_native_cudnn"))
    info = engine.load()
    assert any("attention backend _native_cudnn ignored on CPU" in note for note in info.notes), info.notes
    assert len(engine.generate([ImageSpec("a cat", 1, 256, 256, 1, 3.5)])) == 1
