"""LoRA adapters on the real dummy:tiny pipeline: the engine's slots and hot-swap, and the HTTP side
(GET /loras, the `loras` field, every refusal). Adapters are made here with PEFT, in diffusers and kohya keys."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from api.app import create_app
from models import compile_events
from models.flux import EngineConfig, FluxEngine, ImageSpec
from bench.lora_files import kohya_adapter, peft_adapter
from tests.unit.support import SMALL, PreloadedEngine, make_settings, serve

MAX_RANK = 16
SPEC = ImageSpec(prompt="a lighthouse at dusk", seed=11, width=256, height=256, steps=2, guidance=3.5)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


def _engine(lora_dir, **config) -> FluxEngine:
    values = dict(model="dummy:tiny", device="cpu", warmup_sizes=((256, 256),), warmup_steps=1,
                  lora_dir=str(lora_dir), lora_max_rank=MAX_RANK, lora_cache=2)
    values.update(config)
    engine = FluxEngine(EngineConfig(**values))
    engine.load()
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def lora_engine(lora_dir, bf16_engine):
    engine = _engine(lora_dir)
    tr = engine.pipe.transformer
    peft_adapter(tr, lora_dir / "style-a.safetensors", rank=4, seed=1)
    peft_adapter(tr, lora_dir / "style_b.safetensors", rank=8, seed=2, targets=("to_q", "to_v", "ff.net.2"))
    peft_adapter(tr, lora_dir / "style.c.safetensors", rank=MAX_RANK, seed=3)
    kohya_adapter(tr, lora_dir / "kohya.safetensors", rank=4, seed=4)
    peft_adapter(tr, lora_dir / "too-big.safetensors", rank=MAX_RANK * 2, seed=5)
    (lora_dir / "corrupt.safetensors").write_bytes(os.urandom(4096))
    good = (lora_dir / "style-a.safetensors").read_bytes()
    (lora_dir / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    save_file({"model.weight": torch.zeros(4, 4)}, str(lora_dir / "not-a-lora.safetensors"))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(lora_dir / "wrong-shape.safetensors"))
    nan = load_file(str(lora_dir / "style-a.safetensors"))
    first = next(k for k in nan if "lora_B" in k)
    nan[first] = nan[first].clone().fill_(math.nan)
    save_file(nan, str(lora_dir / "nan.safetensors"))
    style = load_file(str(lora_dir / "style-a.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in style.items()}, str(lora_dir / "fp8.safetensors"))
    save_file({k: torch.zeros((0, v.shape[1])) if "lora_A" in k else torch.zeros((v.shape[0], 0))
               for k, v in style.items()}, str(lora_dir / "rank-0.safetensors"))
    with open(lora_dir / "huge.safetensors", "wb") as fh:  # sparse: larger than any rank-16 adapter of the model
        fh.truncate(64 << 20)
    outside = lora_dir.parent / "outside.safetensors"
    peft_adapter(tr, outside, rank=4, seed=6)
    (lora_dir / "escape.safetensors").symlink_to(outside)
    return engine


def _render(engine, loras=()) -> np.ndarray:
    return np.asarray(engine.generate([dataclasses.replace(SPEC, loras=tuple(loras))])[0])


# ---- the engine -------------------------------------------------------------------------------------------
def test_an_adapter_changes_the_image_and_none_gives_the_base_byte_for_byte(lora_engine, bf16_engine):
    plain = np.asarray(bf16_engine.generate([SPEC])[0])  # a worker without LoRA slots at all
    base = _render(lora_engine)
    assert np.array_equal(base, plain)
    styled = _render(lora_engine, [("style-a", 1.0)])
    assert np.abs(styled.astype(int) - base).mean() > 1.0
    assert np.array_equal(_render(lora_engine), base)  # disabled again: no LoRA math runs
    assert np.array_equal(_render(lora_engine, [("style-a", 0.0)]), base)
    half = _render(lora_engine, [("style-a", 0.5)])
    assert 0 < np.abs(half.astype(int) - base).mean() < np.abs(styled.astype(int) - base).mean()
    assert np.array_equal(_render(lora_engine, [("style-a", 1.0)]), styled)  # a hot-swap back is exact


def test_kohya_keys_load_and_change_the_image(lora_engine):
    base = _render(lora_engine)
    assert np.abs(_render(lora_engine, [("kohya", 1.0)]).astype(int) - base).mean() > 0.5


def test_two_adapters_at_once(lora_engine):
    base = _render(lora_engine).astype(int)
    a = _render(lora_engine, [("style-a", 1.0)]).astype(int)
    b = _render(lora_engine, [("style_b", 1.0)]).astype(int)
    both = _render(lora_engine, [("style-a", 1.0), ("style_b", 1.0)]).astype(int)
    assert not np.array_equal(both, a) and not np.array_equal(both, b) and not np.array_equal(both, base)
    # order is a slot assignment only: the same sum of LoRA deltas
    assert np.abs(_render(lora_engine, [("style_b", 1.0), ("style-a", 1.0)]).astype(int) - both).max() <= 1


def test_the_device_cache_is_an_lru_of_the_configured_size(lora_engine):
    slots = lora_engine.loras
    for name in ("style-a", "style_b", "style.c", "style-a"):
        _render(lora_engine, [(name, 1.0)])
    assert slots.cached() == ["style.c", "style-a"]
    hits = slots.hits
    _render(lora_engine, [("style.c", 0.7)])
    assert slots.hits == hits + 1


def test_switching_adapters_never_recompiles(lora_dir, lora_engine):
    """torch.compile with the eager backend (dynamo's guards and recompiles are the same as inductor's; only the
    code generation is skipped, so it runs on 2 CPU cores in seconds)."""
    engine = _engine(lora_dir, compile=True, compile_backend="eager", warmup_sizes=((320, 256), (256, 256)),
                     warmup_batch=2)
    assert engine.info.compiled
    assert compile_events.count() > 0  # the blocks were compiled during warm-up: the counter sees compiles
    before, structure = compile_events.count(), engine.loras.structure()
    sequence = [[("style-a", 1.0)], [("style_b", 0.5)], [], [("style-a", 0.3), ("style.c", 1.2)], [("kohya", -1.0)],
                [("style.c", 2.0), ("style_b", 1.0), ("style-a", -0.5)], [("style-a", 0.0)], []] * 2
    images = [_render(engine, loras) for loras in sequence]
    wide = dataclasses.replace(SPEC, width=320, loras=(("style_b", 1.0),))
    engine.generate([wide])  # another warmed-up size, and a batch of two, with an adapter
    engine.generate([wide, dataclasses.replace(wide, seed=12)])
    assert compile_events.count() == before, "a request recompiled the transformer"
    assert engine.lora_stats()["compiles_after_ready"] == 0
    assert engine.loras.structure() == structure
    assert np.array_equal(images[2], images[-1]) and not np.array_equal(images[0], images[2])
    assert np.array_equal(images[0], _render(lora_engine, [("style-a", 1.0)]))  # compiled == eager


def test_a_hot_swap_that_deletes_its_slot_is_fatal(lora_dir, lora_engine, monkeypatch):
    """diffusers deletes a slot whose hot-swap failed; every later LoRA request then failed with a 500 on a worker
    that still said ready (a rank-0 file did it). Now the error is fatal: the worker exits for its supervisor."""
    import peft.utils.hotswap

    engine = _engine(lora_dir)

    def failing_copy(*args, **kwargs):  # an injected failure inside the copy into the slot
        raise RuntimeError("planted hot-swap failure")

    monkeypatch.setattr(peft.utils.hotswap, "hotswap_adapter_from_state_dict", failing_copy)
    with pytest.raises(Exception) as failed:
        _render(engine, [("style-a", 1.0)])
    assert getattr(failed.value, "fatal", False) is True, repr(failed.value)
    assert "slot0" in str(failed.value)


def test_a_changed_file_is_read_again(lora_dir, lora_engine, bf16_engine):
    path = lora_dir / "changing.safetensors"
    peft_adapter(lora_engine.pipe.transformer, path, rank=4, seed=10)
    first = _render(lora_engine, [("changing", 1.0)])
    peft_adapter(lora_engine.pipe.transformer, path, rank=4, seed=11)
    os.utime(path, ns=(1, 1))
    assert not np.array_equal(_render(lora_engine, [("changing", 1.0)]), first)


# ---- HTTP ---------------------------------------------------------------------------------------------------
@pytest.fixture
def app_for(lora_engine, lora_dir, tmp_path):
    def build(engine=None, **settings):
        engine = engine or PreloadedEngine(lora_engine)
        engine.loras = lora_engine.loras
        values = dict(lora_dir=str(lora_dir), lora_max_rank=MAX_RANK, lora_cache=2)
        values.update(settings)
        return serve(create_app(make_settings(tmp_path, **values), engine)), engine

    return build


@pytest.mark.anyio
async def test_loras_lists_the_folder(app_for, lora_dir):
    (lora_dir / "bad name!.safetensors").write_bytes(b"x")
    server, _ = app_for()
    async with server as http:
        await http.post("/generate", json=dict(SMALL, loras=[{"name": "style-a"}]))
        body = (await http.get("/loras")).json()
    by_name = {d["name"]: d for d in body["data"]}
    assert {"style-a", "style_b", "style.c", "kohya", "too-big"} <= set(by_name)
    assert "escape" not in by_name and "bad name!" not in by_name  # a symlink out, a name no request can use
    assert by_name["style-a"]["rank"] == 4 and by_name["style_b"]["rank"] == 8
    assert by_name["style-a"]["size_bytes"] == (lora_dir / "style-a.safetensors").stat().st_size
    assert by_name["style-a"]["loaded"] is True
    assert (body["max_per_request"], body["max_rank"], body["enabled"]) == (3, MAX_RANK, True)


@pytest.mark.anyio
async def test_a_request_with_an_adapter_renders_it(app_for):
    server, engine = app_for()
    async with server as http:
        plain = await http.post("/generate", json=SMALL)
        styled = await http.post("/generate", json=dict(SMALL, loras=[{"name": "style-a", "scale": 0.8}]))
        zero = await http.post("/generate", json=dict(SMALL, loras=[{"name": "style-a", "scale": 0}]))
        images = [(await http.get(r.json()["image_url"])).content for r in (plain, styled, zero)]
        oa = await http.post("/v1/images/generations", json={"prompt": SMALL["prompt"], "size": "256x256",
                                                              "seed": 7, "loras": [{"name": "style-a", "scale": 0.8}],
                                                              "response_format": "b64_json"})
        metrics = (await http.get("/metrics")).text
    assert plain.status_code == styled.status_code == zero.status_code == 200
    assert images[0] != images[1] and images[0] == images[2]
    assert oa.status_code == 200, oa.text
    assert engine.batches[-1][0].loras == (("style-a", 0.8),)
    assert "flux_compiles_after_ready" in metrics and "flux_lora_hits_total" in metrics


BAD = [
    ([{"name": "nope"}], "loras.0.name", "no LoRA named"),
    ([{"name": "../outside"}], "loras.0.name", "letters"),
    ([{"name": "style-a/../style_b"}], "loras.0.name", "letters"),
    ([{"name": ".."}], "loras.0.name", "letters"),
    ([{"name": "escape"}], "loras.0.name", "no LoRA named"),
    ([{"name": "style-a"}, {"name": "x" * 65}], "loras.1.name", "at most 64"),
    ([{"name": "style-a", "scale": 2.5}], "loras.0.scale", "less than or equal to 2"),
    ([{"name": "style-a", "scale": "1"}], "loras.0.scale", "number"),
    ([{"name": "style-a", "weight": 1}], "loras.0.weight", "unknown field"),
    ([{"name": "style-a"}, {"name": "style-a"}], "loras.1.name", "twice"),
    ([{"name": n} for n in ("style-a", "style_b", "style.c", "kohya")], "loras", "at most 3"),
    ([{"name": "corrupt"}], "loras.0.name", "safetensors"),
    ([{"name": "truncated"}], "loras.0.name", "safetensors"),
    ([{"name": "not-a-lora"}], "loras.0.name", "LoRA"),
    ([{"name": "wrong-shape"}], "loras.0.name", "shapes"),
    ([{"name": "too-big"}], "loras.0.name", "rank 32 is above"),
    ([{"name": "nan"}], "loras.0.name", "NaN"),
    ([{"name": "huge"}], "loras.0.name", "larger than any adapter"),
    ([{"name": "fp8"}], "loras.0.name", "float16, bfloat16"),  # torch cannot check fp8 for NaN: was a 500
    ([{"name": "rank-0"}], "loras.0.name", "rank 0"),  # its failed hot-swap deleted a slot: every later LoRA failed
    ({"name": "style-a"}, "loras", "list"),
]


@pytest.mark.anyio
async def test_every_bad_adapter_is_a_422_naming_the_field(app_for):
    server, engine = app_for()
    async with server as http:
        for loras, field, words in BAD:
            for route in ("/generate", "/jobs"):
                response = await http.post(route, json=dict(SMALL, loras=loras))
                assert response.status_code == 422, (loras, response.text)
                error = response.json()["error"]
                assert error["field"] == field and words in error["message"], (loras, error)
        oa = await http.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": "../x"}]})
        assert oa.status_code == 422 and oa.json()["error"]["field"] == "loras.0.name"
        assert (await http.get("/health")).status_code == 200
        assert engine.batches == []  # nothing reached the pipeline
        ok = await http.post("/generate", json=dict(SMALL, loras=[{"name": "style_b"}]))
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_a_worker_without_a_folder_refuses_loras(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    async with serve(app) as http:
        response = await http.post("/generate", json=dict(SMALL, loras=[{"name": "style-a"}]))
        assert response.status_code == 422 and response.json()["error"]["field"] == "loras"
        assert (await http.get("/loras")).json()["data"] == []


@pytest.mark.anyio
async def test_fp4_refuses_loras_and_says_why(lora_dir, tmp_path):
    engine = FluxEngine(EngineConfig(model="dummy:tiny", precision="fp4", device="cpu", warmup_sizes=((256, 256),),
                                     warmup_steps=1, lora_dir=str(lora_dir)))
    app = create_app(make_settings(tmp_path, precision="fp4", lora_dir=str(lora_dir)), engine)
    async with serve(app) as http:
        response = await http.post("/generate", json=dict(SMALL, loras=[{"name": "style-a"}]))
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "loras" and "fp4" in response.json()["error"]["message"]
        assert (await http.post("/generate", json=SMALL)).status_code == 200
    assert engine.loras is None and any("fp4" in n for n in engine.info.notes)


def test_batch_keys_separate_adapters_scales_and_modes():
    keys = {dataclasses.replace(SPEC, **change).batch_key for change in (
        {}, {"loras": (("a", 1.0),)}, {"loras": (("a", 0.5),)}, {"loras": (("a", 1.0), ("b", 1.0))},
        {"mode": "img2img", "strength": 0.5}, {"mode": "img2img", "strength": 0.6}, {"mode": "inpaint", "strength": 0.5})}
    assert len(keys) == 7
    assert dataclasses.replace(SPEC, image=object()).batch_key == SPEC.batch_key  # images themselves are per request

