"""The official `openai` Python client, unchanged, against a worker's /v1/images/generations."""
from __future__ import annotations

import base64

import httpx
import openai
import pytest

from tests.production.conftest import assert_png


@pytest.fixture(scope="module")
def client(worker):
    with openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused-without-FLUX_API_KEYS", max_retries=0,
                       timeout=60) as c:
        yield c


def test_url_response(client):
    result = client.images.generate(model="flux", prompt="a red fox in snow", size="256x256",
                                    response_format="url")
    assert isinstance(result.created, int) and len(result.data) == 1
    url = result.data[0].url
    assert url.startswith("http://127.0.0.1:") and url.endswith(".png")
    image = httpx.get(url, timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert_png(image.content, 256, 256)


def test_b64_json_response(client):
    result = client.images.generate(model="flux", prompt="a red fox in snow", size="256x256",
                                    response_format="b64_json")
    assert result.data[0].url is None
    assert_png(base64.b64decode(result.data[0].b64_json), 256, 256)


def test_n_images_and_the_seed_extension(client):
    first = client.images.generate(model="flux", prompt="twins", size="256x256", n=2, response_format="b64_json",
                                   extra_body={"seed": 7})
    again = client.images.generate(model="flux", prompt="twins", size="256x256", n=2, response_format="b64_json",
                                   extra_body={"seed": 7})
    images = [d.b64_json for d in first.data]
    assert len(images) == 2 and images[0] != images[1], "n images must differ (seed, seed+1)"
    assert images == [d.b64_json for d in again.data], "the same seed must give the same bytes"


def test_non_square_size(client):
    result = client.images.generate(model="flux", prompt="wide", size="512x256", response_format="b64_json")
    assert_png(base64.b64decode(result.data[0].b64_json), 512, 256)


@pytest.mark.parametrize("kwargs,param", [
    ({"size": "100x100"}, "size"),
    ({"size": "big"}, "size"),
    ({"n": 50}, "n"),
    ({"response_format": "png"}, "response_format"),
    ({"prompt": ""}, "prompt"),
])
def test_invalid_requests_raise_the_clients_error_with_the_parameter(client, kwargs, param):
    args = {"model": "flux", "prompt": "x", "size": "256x256", **kwargs}
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(**args)
    assert err.value.status_code == 422
    body = err.value.body
    assert body.get("param") == param and body.get("type") == "invalid_request", body


def test_output_format_and_compression_give_a_webp(client):
    result = client.images.generate(model="flux", prompt="a red fox in snow", size="256x256",
                                    response_format="b64_json", output_format="webp", output_compression=30)
    raw = base64.b64decode(result.data[0].b64_json)
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WEBP", raw[:16]
    url = client.images.generate(model="flux", prompt="a red fox in snow", size="256x256",
                                 output_format="jpeg").data[0].url
    assert url.endswith(".jpg")
    image = httpx.get(url, timeout=10)
    assert image.headers["content-type"] == "image/jpeg" and image.content[:3] == b"\xff\xd8\xff"


def test_output_compression_for_a_png_is_refused_naming_the_field(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(model="flux", prompt="a red fox", size="256x256", output_format="png",
                               output_compression=50)
    assert caught.value.status_code == 422
    assert "output_compression: applies to jpeg and webp only" in str(caught.value)
