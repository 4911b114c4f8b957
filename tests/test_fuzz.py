"""Fuzzing: whatever a store writer, an image host or an API caller sends, the guard answers or
refuses with a typed error, records the call once, never answers a multimodal call unguarded
(fail-closed default), and never grows without bound.

Property-based (hypothesis) over stored entries, image bytes and sizes and message content, and
schema-driven (schemathesis) over the server's OpenAPI schema. In CI the examples are the same
on every run (a failure reproduces), locally new ones each time; the budgets keep the module
within about a minute.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from contextlib import suppress

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.server import AppSettings, ServerSettings, create_app, hash_key
from guardrail import GuardedOutput, GuardrailError
from guardrail.errors import InvalidImageError
from guardrail.images import WORKING_PIXELS, load_image
from shift_store import (
    CachedShiftSource,
    LocalShiftStore,
    ShiftFormatError,
    ShiftVector,
    SignedStore,
    StoreError,
)
from tests.helpers import key_of, make_vector
from tests.test_server import Served

settings.register_profile(
    "fuzz",
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("fuzz")

# ---------------------------------------------------------------- stored entries


def _complete_vector() -> ShiftVector:
    base = make_vector(layers=4, hidden=8)
    return ShiftVector(
        vectors=base.vectors,
        meta=base.meta.model_copy(update={"anchor_distance_threshold": 1.5}),
        decode_vectors=base.vectors / 2,
        anchor_mean=torch.zeros(8),
        anchor_std=torch.ones(8),
    )


VALID = _complete_vector().to_bytes()


def _json_values(floats: st.SearchStrategy[float]) -> st.SearchStrategy[object]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | floats | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=6,
    )


JSON_VALUES = _json_values(st.floats())  # NaN and infinities included
WIRE_VALUES = _json_values(st.floats(allow_nan=False, allow_infinity=False))  # what JSON carries


def _parts(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = int.from_bytes(payload[:8], "little")
    return st_load(payload), json.loads(payload[8 : 8 + size])["__metadata__"]


@st.composite
def damaged_entries(draw: st.DrawFn) -> bytes:
    """A valid entry damaged as a writer without the key can: bytes flipped or cut, a header
    field or metadata field replaced, a tensor replaced, dropped or added."""
    tensors, header = _parts(VALID)
    kind = draw(st.sampled_from(["bytes", "cut", "header", "meta", "tensor", "drop", "add"]))
    if kind == "bytes":
        data = bytearray(VALID)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "cut":
        return VALID[: draw(st.integers(0, len(VALID) - 1))]
    if kind == "header":
        field = draw(st.sampled_from([*header, "hmac-sha256"]))
        header[field] = draw(st.text(max_size=70))
    elif kind == "meta":
        meta = json.loads(header["cmrm_meta"])
        field = draw(st.sampled_from([*meta, *(f"model.{k}" for k in meta["model"])]))
        target, _, leaf = (meta["model"], None, field[6:]) if "." in field else (meta, None, field)
        target[leaf] = draw(JSON_VALUES)
        header["cmrm_meta"] = json.dumps(meta)
    elif kind == "tensor":
        name = draw(st.sampled_from(sorted(tensors)))
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64]))
        fill = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e30]))
        tensors[name] = torch.full(shape, fill).to(dtype)
    elif kind == "drop":
        tensors.pop(draw(st.sampled_from(sorted(tensors))))
    else:
        tensors[draw(st.text(min_size=1, max_size=8))] = torch.zeros(2)
    return st_save(tensors, metadata=header)


@given(damaged_entries())
@settings(max_examples=300)
def test_any_damaged_store_entry_is_a_format_error_never_another_exception(payload):
    try:
        vector = ShiftVector.from_bytes(payload)
    except ShiftFormatError:
        return
    assert ShiftVector.from_bytes(vector.to_bytes()).checksum == vector.checksum


@given(damaged_entries(), st.booleans())
@settings(max_examples=60)
def test_a_lookup_of_a_damaged_entry_is_a_miss_with_a_note(tmp_path, payload, signed):
    store = LocalShiftStore(tmp_path / ("signed" if signed else "plain"))
    key = key_of(_complete_vector())
    (store.folder / f"{key.name}.safetensors").write_bytes(payload)
    source = SignedStore(store, b"k") if signed else store
    lookup = CachedShiftSource(source, key).current()  # never raises
    assert lookup.vector is not None or lookup.note
    with pytest.raises(StoreError) if signed else suppress(ShiftFormatError):
        source.get(key)


# ---------------------------------------------------------------- image bytes and sizes


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    width = draw(st.integers(1, 6000))
    height = draw(st.sampled_from([1, 2, width // 25 + 1, width // 3 + 1, width, 4000]))
    if draw(st.booleans()):
        width, height = height, width
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "WEBP"]))
    buffer = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", (width, height)).save(buffer, fmt)
    data = buffer.getvalue()
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


@given(image_bytes() | st.binary(max_size=64))
@settings(max_examples=80)
def test_any_image_decodes_within_the_budgets_or_is_refused(data):
    try:
        image = load_image(data)
    except InvalidImageError:
        return
    width, height = image.size
    assert width * height <= WORKING_PIXELS and max(width, height) <= 20 * min(width, height)


# ---------------------------------------------------------------- message content


TEXT = st.text(max_size=30)
PARTS = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.just({"type": "image"}),
    st.dictionaries(st.sampled_from(["type", "text", "image"]), JSON_VALUES, max_size=3),
    JSON_VALUES,
)
ROLES = st.sampled_from(["user", "assistant", "system", "tool", "function", "x"])
WELL_FORMED = st.fixed_dictionaries(
    {
        "role": ROLES,
        "content": TEXT
        | st.lists(
            st.just({"type": "image"}) | st.builds(lambda t: {"type": "text", "text": t}, TEXT),
            max_size=3,
        ),
    }
)
MESSAGES = st.lists(
    WELL_FORMED
    | st.fixed_dictionaries(
        {"role": ROLES | JSON_VALUES, "content": st.lists(PARTS, max_size=4) | JSON_VALUES}
    )
    | JSON_VALUES,
    max_size=4,
)
PNG = io.BytesIO()
Image.new("RGB", (64, 48), (200, 30, 30)).save(PNG, "PNG")
IMAGES = st.lists(
    st.sampled_from([PNG.getvalue(), b"not an image", PNG.getvalue()[:40], "/no/such/file.png"]),
    max_size=3,
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(record.getMessage()))


@given(st.one_of(TEXT, MESSAGES), IMAGES)
@settings(max_examples=80)
def test_any_message_content_is_answered_guarded_or_refused_typed_with_one_record(
    tiny_vlm, prompt, images
):
    records = _Records()
    logger = logging.getLogger("guardrail.decisions")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)  # guarded calls are logged at INFO
    try:
        output = tiny_vlm.generate(prompt, images, max_new_tokens=1)
    except GuardrailError as e:
        assert e.decision is not None and e.decision.mode_used == "refused"
        output = None
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    event("refused" if output is None else output.decision.mode_used)
    assert len(records.records) == 1
    if isinstance(output, GuardedOutput) and output.decision.multimodal:
        assert output.decision.guarded


# ---------------------------------------------------------------- the server's API

SCHEMA = schemathesis.openapi.from_dict(
    create_app(ServerSettings.development_mode("m", docs=True)).openapi()
)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_path, tmp_path_factory):
    settings_ = ServerSettings(
        model=str(tiny_path),
        store=f"file://{tmp_path_factory.mktemp('fuzz-store')}",
        docs=True,
        apps=(AppSettings(name="a", key_sha256=hash_key("k"), max_tokens=4, max_concurrent=2),),
    )
    server = Served(settings_)
    yield server
    server.stop()


@SCHEMA.parametrize()
@settings(max_examples=40)
def test_the_api_never_answers_an_untyped_500(case, fuzzed_server):
    if isinstance(case.body, dict) and case.operation.path == "/v1/chat/completions":
        case.body["model"] = fuzzed_server.settings.model  # past the model check
    response = case.call(base_url=fuzzed_server.url, headers={"Authorization": "Bearer k"})
    event(f"{case.operation.path}: HTTP {response.status_code}")
    assert response.status_code != 500, response.text[:500]
    if case.operation.path == "/v1/chat/completions" and response.status_code == 200:
        assert "safety" in response.text


OPENAI_PARTS = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.builds(
        lambda url: {"type": "image_url", "image_url": {"url": url}},
        st.sampled_from(
            [
                "data:image/png;base64," + base64.b64encode(PNG.getvalue()).decode(),
                "data:image/png;base64,AAAA",
                "data:text/plain;base64,aGk=",
                "http://127.0.0.1:1/x.png",
                "file:///etc/passwd",
            ]
        ),
    ),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), WIRE_VALUES, max_size=3),
)
OPENAI_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": ROLES, "content": TEXT | st.lists(OPENAI_PARTS, max_size=3) | WIRE_VALUES}
    ),
    min_size=1,
    max_size=3,
)


@given(OPENAI_MESSAGES, st.booleans())
@settings(max_examples=40)
def test_any_openai_message_content_is_answered_guarded_or_refused_with_its_record(
    fuzzed_server, messages, stream
):
    body = {"model": fuzzed_server.settings.model, "messages": messages, "stream": stream}
    response = httpx.post(
        f"{fuzzed_server.url}/v1/chat/completions",
        headers={"Authorization": "Bearer k"},
        json=body,
        timeout=30,
    )
    event(f"HTTP {response.status_code}")
    assert response.status_code in (200, 400), response.text[:500]
    if response.status_code == 400 and "guardrail_error" in response.text:
        assert response.json()["safety"]["mode_used"] == "refused"
    if response.status_code == 200:
        events = response.text.split("data: ") if stream else [response.text]
        safety = [json.loads(e)["safety"] for e in events if '"safety"' in e]
        assert len(safety) == 1  # one record per call
        assert safety[0]["guarded"] or not safety[0]["multimodal"]
