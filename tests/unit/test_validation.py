"""Bad input of every kind: a 4xx JSON error naming the field, nothing reaches the pipeline, the worker stays up."""
from __future__ import annotations

import json

import pytest

from api.app import create_app
from tests.unit.support import SMALL, PreloadedEngine, assert_json_error, make_settings, queue_stats, serve

pytestmark = pytest.mark.anyio


def with_fields(**changes) -> dict:
    body = dict(SMALL)
    for key, value in changes.items():
        if value is DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


DROP = object()
JSON = {"content-type": "application/json"}

# (id, request kwargs for httpx, status, error code, field)
BAD_FIELDS = [
    ("missing-prompt", with_fields(prompt=DROP), "prompt"),
    ("null-prompt", with_fields(prompt=None), "prompt"),
    ("number-prompt", with_fields(prompt=123), "prompt"),
    ("list-prompt", with_fields(prompt=["a", "b"]), "prompt"),
    ("empty-prompt", with_fields(prompt=""), "prompt"),
    ("blank-prompt", with_fields(prompt="   "), "prompt"),
    ("whitespace-prompt", with_fields(prompt="\n\t \r"), "prompt"),
    ("huge-prompt", with_fields(prompt="a" * 2001), "prompt"),
    ("nul-in-prompt", with_fields(prompt="a cat\x00"), "prompt"),
    ("string-width", with_fields(width="512"), "width"),
    ("float-width", with_fields(width=512.0), "width"),
    ("bool-height", with_fields(height=True), "height"),
    ("odd-width", with_fields(width=260), "width"),
    ("odd-height", with_fields(height=1000), "height"),
    ("small-width", with_fields(width=128), "width"),
    ("zero-height", with_fields(height=0), "height"),
    ("negative-width", with_fields(width=-512), "width"),
    ("huge-width", with_fields(width=4096), "width"),
    ("height-over-2048", with_fields(width=2048, height=2064), "height"),
    ("over-4-megapixels", with_fields(width=2048, height=2048), "width"),
    ("negative-seed", with_fields(seed=-1), "seed"),
    ("seed-over-32-bits", with_fields(seed=2**32), "seed"),
    ("huge-seed", with_fields(seed=10**40), "seed"),
    ("string-seed", with_fields(seed="7"), "seed"),
    ("bool-seed", with_fields(seed=True), "seed"),
    ("float-seed", with_fields(seed=7.5), "seed"),
    ("zero-steps", with_fields(num_inference_steps=0), "num_inference_steps"),
    ("negative-steps", with_fields(num_inference_steps=-4), "num_inference_steps"),
    ("too-many-steps", with_fields(num_inference_steps=101), "num_inference_steps"),
    ("string-steps", with_fields(num_inference_steps="4"), "num_inference_steps"),
    ("negative-guidance", with_fields(guidance_scale=-0.5), "guidance_scale"),
    ("huge-guidance", with_fields(guidance_scale=1e9), "guidance_scale"),
    ("string-guidance", with_fields(guidance_scale="high"), "guidance_scale"),
    ("zero-timeout", with_fields(timeout_s=0), "timeout_s"),
    ("unknown-field", with_fields(negative_prompt="blurry"), "negative_prompt"),
    ("unknown-output-format", with_fields(output_format="gif"), "output_format"),
    ("upper-case-output-format", with_fields(output_format="PNG"), "output_format"),
    ("quality-for-png", with_fields(output_format="png", output_quality=80), "output_quality"),
    ("zero-quality", with_fields(output_format="jpeg", output_quality=0), "output_quality"),
    ("string-quality", with_fields(output_format="jpeg", output_quality="80"), "output_quality"),
]


def raw(body: bytes, content_type: str | None = "application/json") -> dict:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": body, "headers": headers}


async def chunked_body(size: int):
    yield b'{"prompt": "'
    for _ in range(size // 4096):
        yield b"a" * 4096
    yield b'"}'


BAD_BODIES = [
    ("invalid-json", raw(b'{"prompt": "a cat",}'), 400, "invalid_json", "body"),
    ("truncated-json", raw(b'{"prompt": "a cat"'), 400, "invalid_json", "body"),
    ("empty-body", raw(b""), 400, "invalid_json", "body"),
    ("not-utf8", raw(b'{"prompt": "\xff\xfe"}'), 400, "invalid_json", "body"),
    ("nan-literal", raw(b'{"prompt": "a", "guidance_scale": NaN}'), 422, "invalid_request", "guidance_scale"),
    ("duplicate-key", raw(b'{"prompt": "a", "prompt": "b"}'), 422, "invalid_request", "prompt"),
    # a nested key given twice is named by its path, not by its bare name (which could be a top-level field)
    ("duplicate-nested-key", raw(b'{"prompt": "a", "loras": [{"name": "x"}, {"name": "x", "name": "y"}]}'), 422,
     "invalid_request", "loras.1.name"),
    ("json-array", raw(json.dumps([SMALL]).encode()), 422, "invalid_request", "body"),
    ("json-string", raw(b'"a cat"'), 422, "invalid_request", "body"),
    ("json-null", raw(b"null"), 422, "invalid_request", "body"),
    ("text-plain", raw(json.dumps(SMALL).encode(), "text/plain"), 415, "unsupported_media_type", "content-type"),
    ("form", raw(b"prompt=a+cat", "application/x-www-form-urlencoded"), 415, "unsupported_media_type",
     "content-type"),
    ("no-content-type", raw(json.dumps(SMALL).encode(), None), 415, "unsupported_media_type", "content-type"),
    ("oversized", raw(json.dumps(with_fields(prompt="a" * 70_000)).encode()), 413, "payload_too_large", "body"),
]


@pytest.fixture
async def worker(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    async with serve(create_app(make_settings(tmp_path), engine)) as http:
        yield http, engine


async def assert_untouched_and_healthy(http, engine) -> None:
    assert engine.batches == [], "a bad request reached the pipeline"
    stats = await queue_stats(http)
    assert (stats["queued"], stats["running"], stats["completed"], stats["failed"]) == (0, 0, 0, 0)
    assert (await http.get("/health")).status_code == 200


@pytest.mark.parametrize("body, field", [case[1:] for case in BAD_FIELDS], ids=[case[0] for case in BAD_FIELDS])
async def test_bad_field_is_a_422_naming_the_field(worker, body, field):
    http, engine = worker
    response = await http.post("/generate", json=body)
    error = assert_json_error(response, 422, "invalid_request", field)
    assert field in error["message"]
    assert error["retryable"] is False
    assert response.headers.get("x-request-id") == error["request_id"]
    await assert_untouched_and_healthy(http, engine)


@pytest.mark.parametrize("request_kwargs, status, code, field", [case[1:] for case in BAD_BODIES],
                         ids=[case[0] for case in BAD_BODIES])
async def test_bad_body_is_a_4xx_naming_the_part(worker, request_kwargs, status, code, field):
    http, engine = worker
    response = await http.post("/generate", **request_kwargs)
    assert_json_error(response, status, code, field)
    await assert_untouched_and_healthy(http, engine)


async def test_oversized_chunked_body_without_length_is_refused(worker):
    http, engine = worker
    response = await http.post("/generate", content=chunked_body(200_000), headers=JSON)
    assert "content-length" not in response.request.headers
    assert_json_error(response, 413, "payload_too_large", "body")
    await assert_untouched_and_healthy(http, engine)


async def test_the_prompt_limit_follows_the_settings(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    async with serve(create_app(make_settings(tmp_path, max_prompt_chars=10), engine)) as http:
        assert_json_error(await http.post("/generate", json=with_fields(prompt="a" * 11)), 422, "invalid_request",
                          "prompt")
        assert (await http.post("/generate", json=with_fields(prompt="a" * 10))).status_code == 200


async def test_worker_serves_normally_after_every_kind_of_bad_input(worker):
    http, engine = worker
    for _, body, _ in BAD_FIELDS:
        assert 400 <= (await http.post("/generate", json=body)).status_code < 500
    for _, kwargs, status, _, _ in BAD_BODIES:
        assert (await http.post("/generate", **kwargs)).status_code == status
    stats = await queue_stats(http)
    assert stats["completed"] == 0 and engine.batches == []
    response = await http.post("/generate", json=SMALL)
    assert response.status_code == 200, response.text
    assert len(engine.batches) == 1
    assert (await http.get(response.json()["image_url"])).status_code == 200


async def test_unknown_route_and_wrong_method_are_json(worker):
    http, _ = worker
    assert_json_error(await http.get("/nope"), 404, "not_found")
    assert_json_error(await http.get("/generate"), 405, "method_not_allowed")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field, template", [
    ("guidance_scale", '{"prompt": "a", "guidance_scale": %s}'),
    ("timeout_s", '{"prompt": "a", "timeout_s": %s}'),
    ("strength", '{"prompt": "a", "strength": %s}'),
    ("loras.0.scale", '{"prompt": "a", "loras": [{"name": "x", "scale": %s}]}'),
])
async def test_a_non_finite_number_is_named_as_such(worker, field, template, literal):
    """NaN used to fail a bound first, answered "less than or equal to 2": true, but not the defect."""
    http, engine = worker
    response = await http.post("/generate", **raw((template % literal).encode()))
    assert_json_error(response, 422, "invalid_request", field)
    assert "finite" in response.json()["error"]["message"], response.text
    await assert_untouched_and_healthy(http, engine)
