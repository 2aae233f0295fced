"""POST /generate end to end in process: response, image bytes, determinism, proxy URLs, service info."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from api import __version__
from api.app import create_app
from api.schemas import MAX_SEED
from tests.unit.support import SMALL, PreloadedEngine, make_settings, png_image, queue_stats, serve

pytestmark = pytest.mark.anyio

PRECISIONS = ["bf16", "fp4"]


@pytest.fixture
def app_for(request, tmp_path):
    def build(precision: str = "bf16", peer=("127.0.0.1", 40123), **settings):
        engine = PreloadedEngine(request.getfixturevalue(f"{precision}_engine"))
        app = create_app(make_settings(tmp_path, precision=precision, **settings), engine)
        return serve(app, peer=peer), engine

    return build


@pytest.mark.parametrize("precision", PRECISIONS)
async def test_generate_returns_the_image_and_its_facts(app_for, precision, tmp_path):
    server, engine = app_for(precision, port=8123, gpu_index=5)
    async with server as http:
        response = await http.post("/generate", json=dict(SMALL, width=320, guidance_scale=2.0))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["image_url"].startswith("http://testserver/images/")
        assert (body["seed"], body["width"], body["height"]) == (7, 320, 256)
        assert (body["num_inference_steps"], body["guidance_scale"]) == (2, 2.0)
        assert (body["model"], body["synthetic"], body["precision"], body["gpu"]) == ("dummy:tiny", True, precision, 5)
        assert body["queue_ms"] >= 0 and body["generate_ms"] > 0
        assert body["request_id"] == response.headers["x-request-id"]
        [batch] = engine.batches
        assert batch[0].prompt == SMALL["prompt"] and batch[0].seed == 7

        image = await http.get(body["image_url"])
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert png_image(image.content).size == (320, 256)
        name = body["image_url"].rsplit("/", 1)[1]
        stored = tmp_path / "images" / name
        assert stored.read_bytes() == image.content
        # the image, like the job, names its worker: a proxy routes GET /images/{name} to the owner
        assert name.startswith("8123-") and body["job_id"].startswith("8123-")


async def test_steps_and_guidance_default_to_the_models(app_for):
    server, engine = app_for("bf16")
    async with server as http:
        response = await http.post("/generate", json={"prompt": "a kite", "width": 256, "height": 256})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["num_inference_steps"] == engine.info.default_steps == 4
        assert body["guidance_scale"] == engine.info.default_guidance


@pytest.mark.parametrize("precision", PRECISIONS)
async def test_same_seed_and_parameters_give_identical_png_bytes(app_for, precision):
    server, _ = app_for(precision)
    async with server as http:
        images = []
        for seed in (11, 11, 12):
            response = await http.post("/generate", json=dict(SMALL, seed=seed))
            assert response.status_code == 200, response.text
            images.append((await http.get(response.json()["image_url"])).content)
        assert images[0] == images[1]
        assert images[0] != images[2]
        assert len({r for r in images}) == 2


async def test_without_a_seed_one_is_drawn_returned_and_reproduces_the_image(app_for):
    server, _ = app_for("bf16")
    async with server as http:
        unseeded = {k: v for k, v in SMALL.items() if k != "seed"}
        first = (await http.post("/generate", json=unseeded)).json()
        second = (await http.post("/generate", json=unseeded)).json()
        for body in (first, second):
            assert isinstance(body["seed"], int) and 0 <= body["seed"] <= MAX_SEED
        assert first["seed"] != second["seed"]
        replay = (await http.post("/generate", json=dict(unseeded, seed=first["seed"]))).json()
        assert replay["seed"] == first["seed"]
        first_png = (await http.get(first["image_url"])).content
        assert (await http.get(replay["image_url"])).content == first_png
        assert (await http.get(second["image_url"])).content != first_png


async def test_forwarded_host_and_proto_from_localhost_make_the_image_url(app_for):
    server, _ = app_for("bf16")
    async with server as http:
        headers = {"X-Forwarded-Host": "images.example.com", "X-Forwarded-Proto": "https"}
        body = (await http.post("/generate", json=SMALL, headers=headers)).json()
        assert body["image_url"].startswith("https://images.example.com/images/")
        # the URL's path is served here (the proxy forwards it unchanged)
        path = body["image_url"].removeprefix("https://images.example.com")
        assert (await http.get(path)).status_code == 200


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(app_for):
    server, _ = app_for("bf16", peer=("203.0.113.9", 51000))
    async with server as http:
        headers = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
        body = (await http.post("/generate", json=SMALL, headers=headers)).json()
        assert body["image_url"].startswith("http://testserver/images/")


async def test_public_url_setting_wins(app_for):
    server, _ = app_for("bf16", public_url="https://api.example.com/")
    async with server as http:
        body = (await http.post("/generate", json=SMALL)).json()
        assert body["image_url"].startswith("https://api.example.com/images/")


@pytest.mark.parametrize("precision", PRECISIONS)
async def test_root_describes_the_service(app_for, precision):
    server, _ = app_for(precision, port=8042, gpu_index=3)
    async with server as http:
        info = (await http.get("/")).json()
        assert info["model"] == "dummy:tiny"
        assert info["synthetic"] is True
        assert info["precision"] == precision
        assert info["device"] == "cpu"
        assert info["gpu"] == 3
        assert info["port"] == 8042
        assert info["state"] == "ready"
        assert info["version"] == __version__
        assert info["default_steps"] == 4


async def test_queue_stats_reports_its_fields_and_counts(app_for):
    server, _ = app_for("bf16", max_concurrent=3, max_queue_size=7)
    async with server as http:
        before = await queue_stats(http)
        for key in ("queued", "running", "max_concurrent", "max_queue_size", "completed", "failed", "rejected",
                    "seconds_per_image", "avg_queue_wait_s", "avg_generate_s", "gpu_memory_used_mb",
                    "gpu_memory_total_mb"):
            assert key in before, key
        assert (before["max_concurrent"], before["max_queue_size"]) == (3, 7)
        assert (before["queued"], before["running"], before["completed"], before["failed"]) == (0, 0, 0, 0)
        assert before["seconds_per_image"] is None
        assert before["gpu_memory_used_mb"] is None  # no GPU here

        for seed in (1, 2):
            assert (await http.post("/generate", json=dict(SMALL, seed=seed))).status_code == 200
        after = await queue_stats(http)
        assert after["completed"] == 2 and after["failed"] == 0
        assert after["seconds_per_image"] > 0 and after["avg_generate_s"] > 0
        assert after["avg_queue_wait_s"] >= 0


@pytest.mark.parametrize("fmt, suffix, media_type, magic", [
    ("jpeg", ".jpg", "image/jpeg", b"\xff\xd8\xff"),
    ("webp", ".webp", "image/webp", b"RIFF"),
    ("png", ".png", "image/png", b"\x89PNG"),
])
async def test_output_format_picks_the_encoding_the_name_and_the_media_type(app_for, fmt, suffix, media_type, magic):
    server, _ = app_for("bf16")
    async with server as http:
        response = await http.post("/generate", json=dict(SMALL, output_format=fmt))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["output_format"] == fmt and body["image_url"].endswith(suffix)
        image = await http.get(body["image_url"])
        assert image.headers["content-type"] == media_type and image.content.startswith(magic)
        assert Image.open(io.BytesIO(image.content)).size == (SMALL["width"], SMALL["height"])


async def test_quality_changes_a_jpeg_and_the_worker_default_format_applies(app_for):
    server, _ = app_for("bf16", output_format="jpeg", output_quality=90)
    async with server as http:
        sizes = {}
        for quality in (10, 95):
            response = await http.post("/generate", json=dict(SMALL, output_quality=quality))
            assert response.status_code == 200, response.text
            assert response.json()["image_url"].endswith(".jpg")  # the worker's FLUX_OUTPUT_FORMAT
            sizes[quality] = len((await http.get(response.json()["image_url"])).content)
        assert sizes[10] < sizes[95]
        refused = await http.post("/generate", json=dict(SMALL, output_format="png", output_quality=50))
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "output_quality"


async def test_quality_without_a_format_on_a_png_worker_is_refused(app_for):
    server, engine = app_for("bf16")
    async with server as http:
        response = await http.post("/generate", json=dict(SMALL, output_quality=50))
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "output_quality"
        assert engine.batches == []
