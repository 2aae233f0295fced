"""Property-based fuzzing with hypothesis: malformed requests of every kind (random JSON values, types, keys,
content types, encodings and sizes) against /generate, /jobs and /v1/images/generations on a real worker.

Every request drawn here is invalid by construction, so each must get a 4xx JSON error body of the expected
status - never a 5xx, never a generation - and the worker must be healthy afterwards. 600 requests in all.
"""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from api.schemas import GenerateRequest
from tests.production.conftest import QUICK_JOB, assert_error

MAX_BODY = 65536  # FLUX_MAX_BODY_BYTES default
OPENAI_ROUTE = "/v1/images/generations"
NATIVE_FIELDS = set(GenerateRequest.model_fields)
# cheap when a case turns out valid by mistake: the test then fails on the 200, not on a long render
NATIVE_BASE = dict(QUICK_JOB)
OPENAI_BASE = {"prompt": "a quick render", "size": "256x256"}


class Case:
    """One malformed request; a body given as a list is sent chunked, without Content-Length."""

    def __init__(self, kind: str, body: bytes | list[bytes], content_type: str | None, expected: tuple[int, ...]):
        self.kind, self.body, self.content_type, self.expected = kind, body, content_type, expected

    def __repr__(self):  # short: hypothesis prints it when a case fails
        raw = self.body if isinstance(self.body, bytes) else b"".join(self.body)
        return f"Case({self.kind}, {self.content_type!r}, {len(raw)} bytes, expected {self.expected}: {raw[:300]!r})"


def dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # NaN/Infinity literals, escaped lone surrogates


# ---- values ---------------------------------------------------------------------------------------------
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
containers = st.lists(json_values, max_size=3) | st.dictionaries(st.text(max_size=8), json_values, max_size=3)
strings = st.text(max_size=30)
floats = st.floats()  # strict integer fields refuse every float, 256.0 included
not_int = st.none() | st.booleans() | floats | strings | containers
not_int_nor_null = st.booleans() | floats | strings | containers
not_number_nor_null = st.booleans() | strings | containers  # strict float fields take ints
not_str_nor_null = st.booleans() | st.integers() | floats | containers
nan = st.just(float("nan"))

bad_prompt = (st.none() | not_str_nor_null
              | st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003", max_size=12)               # empty or blank
              | st.tuples(strings, strings).map(lambda p: f"{p[0]}\x00{p[1]}")          # NUL inside
              | st.tuples(strings, st.integers(0xD800, 0xDFFF)).map(lambda p: p[0] + chr(p[1]))  # lone surrogate
              | st.integers(2001, 6000).map(lambda n: "p" * n))                         # over 2000 characters
bad_side = (not_int | st.integers(max_value=255) | st.integers(min_value=2049)
            | st.integers(256, 2048).filter(lambda v: v % 16))
bad_seed = not_int_nor_null | st.integers(max_value=-1) | st.integers(min_value=2**32)
bad_steps = not_int_nor_null | st.integers(max_value=0) | st.integers(min_value=101)
bad_guidance = (not_number_nor_null | nan | st.floats(max_value=-1e-9) | st.floats(min_value=30.000001)
                | st.integers(max_value=-1) | st.integers(min_value=31))
bad_timeout = (not_number_nor_null | nan | st.floats(max_value=0.0) | st.floats(min_value=3600.000001)
               | st.integers(max_value=0) | st.integers(min_value=3601))
bad_format = not_str_nor_null | strings.filter(lambda s: s not in ("png", "jpeg", "webp"))
bad_quality = not_int_nor_null | st.integers(max_value=0) | st.integers(min_value=101)
# the custom-model fields: this worker has no FLUX_LORA_DIR (any adapter is refused) and the base body no image
# (a mask or strength alone is refused); a random string is never a decodable image nor a stored image's name
bad_loras = not_str_nor_null.filter(lambda v: not isinstance(v, list)) | strings | st.lists(
    json_values | st.fixed_dictionaries({"name": strings}, optional={"scale": json_values}), min_size=1, max_size=5)
bad_image = not_str_nor_null | strings
bad_strength = not_number_nor_null | nan | st.floats() | st.integers()
NATIVE_BAD = {"prompt": bad_prompt, "width": bad_side, "height": bad_side, "seed": bad_seed,
              "num_inference_steps": bad_steps, "guidance_scale": bad_guidance, "timeout_s": bad_timeout,
              "output_format": bad_format, "output_quality": bad_quality, "loras": bad_loras, "image": bad_image,
              "mask": bad_image, "strength": bad_strength}

side_ints = st.integers(0, 99999)
bad_size = (not_str_nor_null
            | strings.filter(lambda s: s.lower() != "auto" and not re.fullmatch(r"[0-9]+x[0-9]+", s.lower()))
            | st.tuples(side_ints.filter(lambda v: not (256 <= v <= 2048 and v % 16 == 0)), side_ints)
            .map(lambda p: f"{p[0]}x{p[1]}")
            | st.sampled_from(["\u00b2x\u00b2", "\u0663\u0663x256", "1" * 5000 + "x256", "256x", "x256", "256*256",
                               "-256x256", "256x256x256", " 256x256", "256 x 256", "+256x256"]))
OPENAI_BAD = {
    "prompt": bad_prompt,
    "n": not_int | st.integers(max_value=0) | st.integers(min_value=5),
    "size": bad_size,
    "response_format": not_str_nor_null | strings.filter(lambda s: s not in ("url", "b64_json")),
    "seed": not_int_nor_null | st.integers(max_value=-1) | st.integers(min_value=2**32),
    "model": not_str_nor_null, "quality": not_str_nor_null, "style": not_str_nor_null, "user": not_str_nor_null,
    "output_format": not_str_nor_null | strings.filter(lambda s: s not in ("png", "jpeg", "webp")),
    "output_compression": not_int_nor_null | st.integers(max_value=-1) | st.integers(min_value=101),
    "loras": bad_loras,
}

JSONISH = re.compile(r"^(application/json|.*\+json)$")
bad_content_types = (st.none()
                     | st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "text/json", "text/html",
                                        "multipart/form-data; boundary=xyz", "application/xml", "image/png",
                                        "application/octet-stream", "application/jsonp", "application/json-seq",
                                        "json", "*/*", "application/*", ""])
                     | st.from_regex(r"\A[a-z]{1,12}/[a-z0-9.+-]{1,20}\Z").filter(lambda c: not JSONISH.match(c)))


def not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return False


# ---- cases --------------------------------------------------------------------------------------------
@st.composite
def malformed(draw, route: str) -> Case:
    native = route != OPENAI_ROUTE
    base = NATIVE_BASE if native else OPENAI_BASE
    bad = NATIVE_BAD if native else OPENAI_BAD
    kinds = ["not_object", "no_prompt", "bad_field", "bad_field", "bad_field", "content_type", "not_json",
             "huge_number", "deep_nesting", "oversized", "oversized_chunked"]
    if native:
        kinds.append("unknown_field")  # the OpenAI route ignores unknown fields, as OpenAI's API does
    kind = draw(st.sampled_from(kinds))
    json_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "Application/JSON",
                                      "application/vnd.api+json"]))

    if kind == "not_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Case(kind, dumps(value), json_type, (422,))
    if kind == "no_prompt":
        body = draw(st.dictionaries(st.text(max_size=12).filter(lambda k: k != "prompt"), json_values, max_size=6))
        return Case(kind, dumps(body), json_type, (422,))
    if kind == "bad_field":
        field = draw(st.sampled_from(sorted(bad)))
        return Case(f"bad_{field}", dumps({**base, field: draw(bad[field])}), json_type, (422,))
    if kind == "unknown_field":
        key = draw(st.text(max_size=20).filter(lambda k: k not in NATIVE_FIELDS))
        return Case(kind, dumps({**base, key: draw(json_values)}), json_type, (422,))
    if kind == "content_type":
        return Case(kind, dumps(base), draw(bad_content_types), (415,))
    if kind == "not_json":
        valid = dumps(base)
        raw = draw(st.binary(max_size=300).filter(not_json)
                   | st.integers(0, len(valid) - 1).map(lambda n: valid[:n])
                   | st.sampled_from([b"{'prompt': 'single quotes'}", b'{"prompt": "x",}', b"\xff\xfe{}", b"{}}",
                                      b'{"prompt": "x"} trailing', b"\x00", b"", b"   "]))
        return Case(kind, raw, json_type, (400,))
    if kind == "huge_number":
        digits = draw(st.integers(4301, 20000))
        field = draw(st.sampled_from(["seed", "width", "n", "num_inference_steps"]))
        return Case(kind, dumps(base)[:-1] + f', "{field}": 1{"0" * digits}}}'.encode(), json_type, (400,))
    if kind == "deep_nesting":
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        depth = draw(st.integers(1200, (MAX_BODY - 64) // len(opener + closer)))  # under the body limit
        return Case(kind, b'{"prompt": ' + opener * depth + b"1" + closer * depth + b"}", json_type, (400,))
    size = draw(st.integers(MAX_BODY + 1, 4 * MAX_BODY))
    body = dumps({**base, "prompt": "p" * size})
    if kind == "oversized":
        return Case(kind, body, json_type, (413,))
    chunk = draw(st.integers(1024, 32768))
    return Case(kind, [body[i:i + chunk] for i in range(0, len(body), chunk)], json_type, (413,))


def send(worker, route: str, case: Case):
    headers = {} if case.content_type is None else {"Content-Type": case.content_type}
    body = case.body if isinstance(case.body, bytes) else iter(case.body)
    return worker.client.post(route, content=body, headers=headers)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("route,examples", [("/generate", 220), ("/jobs", 160), (OPENAI_ROUTE, 220)])
def test_malformed_requests_get_a_4xx_json_error(worker, route, examples):
    before = worker.stats()
    kinds: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=malformed(route))
    def check(case: Case):
        resp = send(worker, route, case)
        kinds.append(case.kind)
        assert 400 <= resp.status_code < 500, f"{case!r} -> {resp.status_code} {resp.text[:300]}"
        assert_error(resp, case.expected)

    check()
    assert len(kinds) >= examples, f"only {len(kinds)} requests were sent"
    assert len({k.removeprefix("bad_") for k in kinds}) >= 8, f"too few kinds of malformed request: {set(kinds)}"
    after = worker.stats()
    assert after["images_generated"] == before["images_generated"], "a malformed request reached the pipeline"
    assert after["completed"] + after["failed"] + after["queued"] + after["running"] == \
        before["completed"] + before["failed"] + before["queued"] + before["running"], "a malformed request was queued"
    assert worker.health().status_code == 200


def test_worker_serves_normally_after_the_fuzzing(worker):
    assert worker.health().status_code == 200
    assert worker.client.post("/generate", json=QUICK_JOB).status_code == 200
    assert worker.client.post(OPENAI_ROUTE, json=OPENAI_BASE).status_code == 200
