"""LoRA adapters, image-to-image and inpainting through the real stack: `start_multi_gpu.sh worker 0` (a
dummy:tiny bf16 worker process with FLUX_LORA_DIR) behind `start_multi_gpu.sh nginx`, with NGINX_MAX_BODY
raised as docs/OPERATIONS.md says, so a request with a megabyte of image passes nginx."""
from __future__ import annotations

import base64
import io
import os
import shutil
import signal

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench.lora_files import kohya_adapter, peft_adapter
from models.dummy import SPECS
from tests.ports import free_port
from tests.production.conftest import LEAK_RE, PYTHON, wait_until
from tests.production.test_nginx import START, Supervised
from tests.harness.process import healthy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

BODY = {"prompt": "a harbour at night", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 3}


def _b64(image: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: apt-get install nginx (./run_tests.sh installs it)")
    tmp = tmp_path_factory.mktemp("custom")
    loras = tmp / "loras"
    loras.mkdir()
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        skeleton = FluxTransformer2DModel(**SPECS["tiny"].transformer)
    peft_adapter(skeleton, loras / "ink.safetensors", rank=4, seed=1)
    kohya_adapter(skeleton, loras / "kohya-style.safetensors", rank=4, seed=2)
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    port, nginx_port = free_port(), free_port()
    logs = tmp / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_") and k != "VIRTUAL_ENV"}
    env.update({
        "NUM_GPUS": "1", "BASE_PORT": str(port), "NGINX_PORT": str(nginx_port), "NGINX_ADDR": "127.0.0.1",
        "FLUX_MODE": "bf16", "FLUX_DEVICE": "cpu", "FLUX_MODEL": "dummy:tiny", "FLUX_PYTHON": PYTHON,
        "FLUX_RUN_DIR": str(tmp / "run"), "FLUX_LOG_DIR": str(logs), "FLUX_OUTPUT_DIR": str(tmp / "outputs"),
        "NGINX_LOG_DIR": str(logs), "NO_COLOR": "1", "FLUX_WARMUP_SIZES": "256x256", "FLUX_WARMUP_STEPS": "1",
        "FLUX_DRAIN_TIMEOUT": "10", "FLUX_LORA_DIR": str(loras), "FLUX_LORA_MAX_RANK": "8",
        "NGINX_MAX_BODY": "28m",
    })
    worker = Supervised([str(START), "worker", "0"], env, logs / "unit-worker0.log").start()
    nginx = Supervised([str(START), "nginx"], env, logs / "unit-nginx.log").start()
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 180, 0.3, "worker")
        wait_until(lambda: healthy(f"http://127.0.0.1:{nginx_port}"), 30, 0.2, "nginx")
        yield {"nginx": f"http://127.0.0.1:{nginx_port}", "worker": f"http://127.0.0.1:{port}", "logs": logs}
    finally:
        worker.stop()
        nginx.stop(signal.SIGQUIT)


def _image(client: httpx.Client, response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(client.get(response.json()["image_url"]).content)).convert("RGB"))


@pytest.mark.parametrize("via", ["nginx", "worker"])
def test_adapters_and_input_images_through_the_stack(stack, via):
    with httpx.Client(base_url=stack[via], timeout=120) as http:
        listing = http.get("/loras").json()
        assert {d["name"] for d in listing["data"]} == {"ink", "kohya-style", "broken"}
        base = _image(http, http.post("/generate", json=BODY))
        inked = _image(http, http.post("/generate", json=dict(BODY, loras=[{"name": "ink", "scale": 1.0}])))
        both = _image(http, http.post("/generate", json=dict(BODY, loras=[{"name": "ink"}, {"name": "kohya-style"}])))
        zero = _image(http, http.post("/generate", json=dict(BODY, loras=[{"name": "ink", "scale": 0.0}])))
        assert not np.array_equal(base, inked) and not np.array_equal(inked, both)
        assert np.array_equal(base, zero)

        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (640, 640, 3), dtype=np.uint8))
        big = _b64(noise)
        assert len(big) > 1_100_000  # over nginx's default client_max_body_size (1m)
        out = _image(http, http.post("/generate", json=dict(BODY, image=big, strength=0.6)))
        assert out.shape == (256, 256, 3)
        own = _image(http, http.post("/generate", json={"prompt": "x", "image": _b64(noise.resize((320, 240)), "JPEG"),
                                                        "num_inference_steps": 2}))
        assert own.shape == (256, 336, 3)  # the input's shape, sides at least 256, multiples of 16
        mask = Image.new("L", (640, 640), 0)
        mask.paste(255, (0, 0, 320, 640))
        painted = _image(http, http.post("/generate", json=dict(BODY, image=big, mask=_b64(mask), strength=1.0)))
        assert painted.shape == (256, 256, 3)

        for body, field in ((dict(BODY, loras=[{"name": "broken"}]), "loras.0.name"),
                            (dict(BODY, loras=[{"name": "../loras/ink"}]), "loras.0.name"),
                            (dict(BODY, image="https://example.com/a.png"), "image"),
                            (dict(BODY, image=big, mask=_b64(mask.resize((64, 64)))), "mask"),
                            (dict(BODY, image=big[:5000]), "image")):
            response = http.post("/generate", json=body)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["field"] == field
            assert not LEAK_RE.search(response.text), response.text
        assert http.get("/health").status_code == 200
    metrics = httpx.get(f"{stack['worker']}/metrics").text
    assert 'flux_compiles_after_ready{' in metrics and "flux_lora_swaps_total" in metrics
