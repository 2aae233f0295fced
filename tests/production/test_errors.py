"""Every error a client can provoke is a JSON body that names the problem and leaks nothing (no traceback,
no source file, no path); CORS stays off unless configured; the worker is healthy afterwards."""
from __future__ import annotations

import json

import pytest

from tests.production.conftest import QUICK_JOB, assert_error

JSON = {"Content-Type": "application/json"}
BIG = 70_000  # over the default FLUX_MAX_BODY_BYTES (65536)

CASES = [
    # method, path, raw body, headers, status, code, the field the error must name (None: not checked)
    ("GET", "/no/such/route", None, {}, 404, "not_found", None),
    ("GET", "/generate", None, {}, 405, "method_not_allowed", None),
    ("PUT", "/jobs", b"{}", JSON, 405, "method_not_allowed", None),
    ("POST", "/generate", b"prompt=cat", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", "content-type"),
    ("POST", "/generate", b'{"prompt": "cat"}', {}, 415, "unsupported_media_type", "content-type"),
    ("POST", "/generate", b'{"prompt": "cat",', JSON, 400, "invalid_json", "body"),
    ("POST", "/generate", b"\xff\xfe\x00garbage", JSON, 400, "invalid_json", "body"),
    ("POST", "/generate", b'["a", "list"]', JSON, 422, "invalid_request", "body"),
    ("POST", "/generate", json.dumps({"prompt": "x" * BIG}).encode(), JSON, 413, "payload_too_large", "body"),
    ("POST", "/generate", json.dumps({"prompt": "x" * 2001}).encode(), JSON, 422, "invalid_request", "prompt"),
    ("POST", "/generate", b'{"prompt": "cat", "width": 1000}', JSON, 422, "invalid_request", "width"),
    ("POST", "/generate", b'{"prompt": "cat", "__class__": 1}', JSON, 422, "invalid_request", "__class__"),
    ("POST", "/jobs", b'{"prompt": "cat", "seed": -1}', JSON, 422, "invalid_request", "seed"),
    ("POST", "/jobs", b'{"prompt": "cat", "guidance_scale": NaN}', JSON, 422, "invalid_request", "guidance_scale"),
    ("POST", "/v1/images/generations", b'{"prompt": "cat", "size": "../../etc"}', JSON, 422, "invalid_request",
     "size"),
    ("POST", "/v1/images/generations", b'{"prompt": "cat", "n": "2"}', JSON, 422, "invalid_request", "n"),
    # a key given twice has no one meaning (the last would silently win): refused, naming it
    ("POST", "/generate", b'{"prompt": "cat", "width": 256, "prompt": "dog"}', JSON, 422, "invalid_request",
     "prompt"),
    ("POST", "/jobs", b'{"prompt": "cat", "loras": [{"name": "a", "name": "b"}]}', JSON, 422, "invalid_request",
     "loras.0.name"),  # named by its path
    ("POST", "/v1/images/generations", b'{"prompt": "cat", "n": 1, "n": 2}', JSON, 422, "invalid_request", "n"),
    ("GET", "/images/..%2f..%2fapi%2fapp.py", None, {}, 404, "not_found", None),
    ("GET", "/images/%2e%2e%2fmain_bf16.py", None, {}, 404, "not_found", None),
    ("GET", "/images/00000000000000000000000000000000.png", None, {}, 404, "not_found", None),
    ("GET", "/jobs/..%2f..%2fetc%2fpasswd", None, {}, 404, "not_found", None),
    ("DELETE", "/jobs/%00", None, {}, 404, "not_found", None),
]


@pytest.mark.parametrize("method,path,body,headers,status,code,field", CASES,
                         ids=[f"{c[0]} {c[1][:30]} {c[4]}" for c in CASES])
def test_error_is_json_names_the_problem_and_leaks_nothing(worker, method, path, body, headers, status, code,
                                                           field):
    before = worker.stats()["images_generated"]
    resp = worker.client.request(method, path, content=body, headers=headers)
    error = assert_error(resp, status, code)
    if field is not None:
        assert error["field"] == field, error
    assert worker.stats()["images_generated"] == before, "a rejected request reached the pipeline"


def test_validation_error_names_the_field(worker):
    error = assert_error(worker.client.post("/generate", json=dict(QUICK_JOB, height="256")), 422)
    assert error["field"] == "height" and error["param"] == "height"


def test_cors_is_off_unless_configured(worker):
    preflight = worker.client.options("/generate", headers={"Origin": "https://evil.example",
                                                            "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    resp = worker.client.post("/generate", json={"prompt": ""}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in resp.headers


def test_worker_is_healthy_after_the_errors(worker):
    assert worker.health().status_code == 200
    assert worker.client.post("/generate", json=QUICK_JOB).status_code == 200
