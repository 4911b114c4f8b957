"""The LangChain adapter: image formats, trust, decisions, batching, async, hostile input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import torch
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import ChatMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableLambda
from PIL import Image

from adapters.caching import GuardedCache
from adapters.langchain import ChatGuardedVLM
from adapters.messages import UnsupportedContentError
from adapters.remote_images import ImageFetchError, RemoteImageFetcher
from guardrail import GuardUnavailableError, InvalidImageError, InvalidInputError
from guardrail.testing import anchor_prompts, synthetic_image
from guardrail.trust import AnchorDistance, AnchorStats, ByImageSource, TrustInput, Verdict

from .helpers import SHARED_REDIS


def png_bytes(seed: int = 0, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    synthetic_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()


def openai_image(data: bytes = PNG, text: str = "What is in this picture?") -> HumanMessage:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return HumanMessage(
        content=[{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    )


class _Handler(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str | None]] = []  # Host headers received

    def do_GET(self):
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, "image/png", PNG, {}),
            "/html": (200, "text/html", b"<html></html>", {}),
            "/big.png": (200, "image/png", b"\x89PNG" + bytes(3_000_000), {}),
            "/to-private": (
                302,
                "text/plain",
                b"",
                {"Location": f"http://127.0.0.2:{port}/img.png"},
            ),
            "/to-img": (302, "text/plain", b"", {"Location": "/img.png"}),
            "/missing": (404, "text/plain", b"no", {}),
        }
        if self.path == "/slow.png":
            time.sleep(2)
        if self.path in ("/drip-status.png", "/drip-headers.png"):  # a byte every 0.3 s
            head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 4\r\n\r\n"
            start = 0 if self.path == "/drip-status.png" else head.index(b"\r\n") + 2
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(head[:start])
                for byte in head[start:]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)
            return
        if self.path == "/drip.png":  # answers at once, then one byte every 0.3 s
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "20")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(20):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.3)
            return
        type(self).hosts.append(self.headers.get("Host"))
        status, kind, body, headers = routes.get(self.path, (200, "image/png", PNG, {}))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)  # the client may give up on purpose (size cap)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def tiny_chat(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return ChatGuardedVLM.from_model_id(
        model=str(tiny_path),
        app="tiny-app",
        store=f"file://{store}",
        max_tokens=6,
        allow_image_networks=["127.0.0.1/32"],
    )


# ---------------------------------------------------------------- image formats


def test_all_image_formats_offline(tiny_chat, image_server):
    """The three formats of langchain-tests' test_image_inputs, without the internet."""
    messages = [
        openai_image(),
        HumanMessage(
            content=[
                {"type": "text", "text": "Describe."},
                {"type": "image", "base64": B64, "mime_type": "image/png"},
            ]
        ),
        HumanMessage(
            content=[
                {"type": "text", "text": "Describe."},
                {"type": "image", "url": f"{image_server}/img.png"},
            ]
        ),
    ]
    modes = []
    for message in messages:
        safety = tiny_chat.invoke([message]).response_metadata["safety"]
        assert safety["multimodal"] and safety["guarded"] and safety["app"] == "tiny-app"
        modes.append(safety["mode_used"])
    # the default trust policy: inline images trusted, a remote URL untrusted (sample level)
    assert modes == ["dataset"] * (len(messages) - 1) + ["sample"]


def test_several_images_in_one_message(tiny_chat):
    message = HumanMessage(
        content=[
            {"type": "image", "base64": B64, "mime_type": "image/png"},
            {"type": "text", "text": "Compare these"},
            {
                "type": "image",
                "base64": base64.b64encode(png_bytes(1)).decode(),
                "mime_type": "image/png",
            },
        ]
    )
    result = tiny_chat.invoke([message])
    assert result.usage_metadata["input_tokens"] > 32  # 2 x 16 image tokens
    assert result.response_metadata["safety"]["guarded"]


def test_text_only_passes_through_unmodified(tiny_chat):
    messages = [SystemMessage("Be brief."), HumanMessage("Hello there")]
    result = tiny_chat.invoke(messages)
    engine = tiny_chat.guarded_model.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_new_tokens=6,
        mode="off",
    )
    assert result.content == engine.text
    safety = result.response_metadata["safety"]
    assert safety["mode_used"] == "text-only" and not safety["guarded"]
    assert safety["trusted"] is None


# ---------------------------------------------------------------- hostile and bad input


@pytest.mark.parametrize(
    "path, match",
    [
        ("/html", "content type"),
        ("/big.png", "exceeds"),
        ("/to-private", "non-public"),
        ("/missing", "HTTP 404"),
    ],
)
def test_remote_image_rules(image_server, path, match):
    fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"], max_bytes=1_000_000)
    with pytest.raises(ImageFetchError, match=match):
        fetcher.fetch(f"{image_server}{path}")
    assert fetcher.fetch(f"{image_server}/to-img") == PNG  # a redirect to an allowed hop


def test_remote_image_address_scheme_allow_list_and_timeout(image_server):
    default = RemoteImageFetcher()
    for url, match in (
        (f"{image_server}/img.png", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/x.png", "non-public"),
        ("http://10.1.2.3/x.png", "non-public"),
        ("file:///etc/passwd", "scheme"),
        ("ftp://example.com/x.png", "scheme"),
    ):
        with pytest.raises(ImageFetchError, match=match):
            default.fetch(url)
    listed = RemoteImageFetcher(allow_hosts=["images.example.com"], allow_networks=["127.0.0.1/32"])
    with pytest.raises(ImageFetchError, match="allow list"):
        listed.fetch(f"{image_server}/img.png")
    slow = RemoteImageFetcher(allow_networks=["127.0.0.1/32"], timeout_s=0.5)
    with pytest.raises(ImageFetchError, match="timed out"):
        slow.fetch(f"{image_server}/slow.png")


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")  # 144 MP, a few kB on disk
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"definitely not an image", "not a readable image"),
        (PNG[: len(PNG) // 2], "truncated"),
        (_bomb(), "out of range|decompression|not a readable"),
    ],
)
def test_bad_images_are_refused_with_a_decision(tiny_chat, data, match, caplog):
    with (
        caplog.at_level(logging.INFO, logger="guardrail.decisions"),
        pytest.raises(InvalidImageError, match=match) as info,
    ):
        tiny_chat.invoke([openai_image(data)])
    assert info.value.decision.mode_used == "refused" and not info.value.decision.guarded
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guardrail.decisions"]
    assert logged[-1]["mode_used"] == "refused" and "InvalidImageError" in logged[-1]["reason"]


@pytest.mark.parametrize("options", [{"max_tokens": -1}, {"seed": 2**80, "temperature": 0.5}])
def test_impossible_sampling_settings_are_refused_with_a_decision(tiny_chat, options):
    with pytest.raises(InvalidInputError) as info:
        tiny_chat.invoke([openai_image()], **options)
    assert info.value.decision is not None and info.value.decision.mode_used == "refused"


def test_bad_base64_and_unsupported_blocks(tiny_chat):
    with pytest.raises(InvalidImageError, match="base64"):
        tiny_chat.invoke(
            [
                HumanMessage(
                    content=[{"type": "image", "base64": "%%%not-base64", "mime_type": "image/png"}]
                )
            ]
        )
    with pytest.raises(UnsupportedContentError, match="audio"):
        tiny_chat.invoke(
            [HumanMessage(content=[{"type": "audio", "base64": B64, "mime_type": "audio/wav"}])]
        )
    with pytest.raises(InvalidImageError, match="non-public"):
        tiny_chat.invoke(
            [HumanMessage(content=[{"type": "image", "url": "http://192.168.1.1/cam.png"}])]
        )


# ---------------------------------------------------------------- trust


def test_trust_policies_choose_the_shift_level(tiny_path, tmp_path, image_server):
    chat = ChatGuardedVLM.from_model_id(
        model=str(tiny_path),
        app="trust",
        store=f"file://{tmp_path}",
        max_tokens=3,
        trust_policy="image-source",
        allow_image_networks=["127.0.0.1/32"],
    )
    inline = chat.invoke([openai_image()]).response_metadata["safety"]
    assert inline["trusted"] is True and inline["mode_used"] == "dataset"
    remote = chat.invoke(
        [
            HumanMessage(
                content=[
                    {"type": "text", "text": "Describe."},
                    {"type": "image", "url": f"{image_server}/img.png"},
                ]
            )
        ]
    ).response_metadata["safety"]
    assert remote["trusted"] is False and remote["mode_used"] == "sample"
    assert "remote" in remote["trust_reason"]
    override = chat.invoke([openai_image()], trust="untrusted").response_metadata["safety"]
    assert override["mode_used"] == "sample" and "caller override" in override["trust_reason"]
    # an inline image in a message of a role the policy does not know is not the user's
    for role in ("function", "observation", "assistant"):
        other = ChatMessage(role=role, content=openai_image().content)
        safety = chat.invoke([HumanMessage("Look."), other]).response_metadata["safety"]
        assert safety["trusted"] is False and safety["mode_used"] == "sample", role


def test_anchor_distance_policy_and_custom_policy(tiny_path, tmp_path):
    chat = ChatGuardedVLM.from_model_id(
        model=str(tiny_path),
        app="anchor",
        store=f"file://{tmp_path}",
        max_tokens=3,
        trust_policy="anchor-distance",
    )
    stats = chat.guarded_model.anchor_stats()
    assert stats is not None and stats.threshold > 0
    anchor_like = chat.invoke([openai_image(text="What is in this picture?")])
    assert "anchor distance" in anchor_like.response_metadata["safety"]["trust_reason"]

    class NightShift:
        def classify(self, call: TrustInput, anchor) -> Verdict:
            return Verdict(False, f"custom: {len(call.image_sources)} image(s) at night")

    custom = ChatGuardedVLM.from_model_id(
        model=str(tiny_path),
        app="anchor",
        store=f"file://{tmp_path}",
        max_tokens=3,
        trust_policy=NightShift(),
    )
    safety = custom.invoke([openai_image()]).response_metadata["safety"]
    assert safety["trusted"] is False and safety["trust_reason"].startswith("custom: 1 image")


def test_anchor_distance_threshold_logic():
    stats = AnchorStats(mean=torch.zeros(4), std=torch.ones(4), threshold=1.5)
    near = TrustInput(("inline",), lambda: torch.tensor([1.0, -1.0, 1.0, -1.0]))
    far = TrustInput(("inline",), lambda: torch.tensor([3.0, 3.0, 3.0, 3.0]))
    assert stats.distance(near.text_state()) == pytest.approx(1.0)
    assert AnchorDistance().classify(near, stats).trusted
    assert not AnchorDistance().classify(far, stats).trusted
    assert not AnchorDistance().classify(near, None).trusted
    assert ByImageSource().classify(
        TrustInput(("inline", "remote"), lambda: None), None
    ) == Verdict(False, "image source remote is untrusted")


# ---------------------------------------------------------------- decisions, apps, batching


class _Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events = []

    def on_custom_event(self, name, data, **kwargs):
        self.events.append((name, data))


def test_smollm_invoke_stream_batch_with_redis(smollm_path, namespace, caplog):
    chat = ChatGuardedVLM.from_model_id(
        model=str(smollm_path),
        app="support-bot",
        alpha=0.8,
        store=f"{SHARED_REDIS}?namespace={namespace}",
        max_tokens=12,
        anchor_name="first-8",
        anchors=anchor_prompts()[:8],
    )
    vlm = chat.guarded_model
    message = openai_image(png_bytes(3, (96, 96)))
    recorder = _Recorder()
    with caplog.at_level(logging.INFO, logger="guardrail.decisions"):
        result = chat.invoke([message], config={"callbacks": [recorder]})
    safety = result.response_metadata["safety"]
    shift = vlm.dataset_shift
    expected = {
        "app": "support-bot",
        "model": vlm.fingerprint.id,
        "multimodal": True,
        "guarded": True,
        "trusted": True,
        "mode_used": "dataset",
        "alpha": 0.8,
        "layers": [25],
        "positions": "last",
        "shift_level": "dataset",
        "shift_id": shift.checksum[:12],
        "shift_key": vlm.shifts.source.key.name,
        "shift_version": shift.checksum,
        "fallbacks": [],
        "batch_rows": 1,
    }
    assert {k: safety[k] for k in expected} == expected
    assert safety["shift_norm"] == pytest.approx(float(shift.vectors[25].norm()), rel=1e-5)
    assert safety["added_latency_ms"] > 0 and len(safety["call_id"]) == 32
    assert result.response_metadata["model_name"] == str(smollm_path)
    assert (
        result.usage_metadata["output_tokens"]
        == len(vlm.tokenizer(result.content, add_special_tokens=False).input_ids)
        or result.usage_metadata["output_tokens"] == 12
    )
    assert recorder.events == [("guardrail_decision", safety)]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guardrail.decisions"]
    assert logged == [safety]
    assert "What is in this picture?" not in caplog.text and B64[:40] not in caplog.text

    chunks = list(chat.stream([message]))
    assert len(chunks) > 3  # really streamed, token by token
    merged = sum(chunks[1:], chunks[0])
    assert merged.content == result.content
    assert merged.response_metadata["safety"]["mode_used"] == "dataset"
    assert merged.usage_metadata["output_tokens"] == result.usage_metadata["output_tokens"]

    batch = chat.batch([[message], [HumanMessage("What is 2+2?")]])
    assert batch[0].content == result.content
    assert [b.response_metadata["safety"]["batch_rows"] for b in batch] == [2, 2]
    assert batch[1].response_metadata["safety"]["mode_used"] == "text-only"


def test_two_apps_share_one_model_with_their_own_alpha(tiny_path, tmp_path):
    a = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="app-a", alpha=0.0, store=f"file://{tmp_path}", max_tokens=6
    )
    b = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="app-b", alpha=4.0, store=f"file://{tmp_path}", max_tokens=6
    )
    assert a.guarded_model.model is b.guarded_model.model  # loaded once
    ra, rb = a.invoke([openai_image()]), b.invoke([openai_image()])
    sa, sb = ra.response_metadata["safety"], rb.response_metadata["safety"]
    assert (sa["app"], sa["alpha"], sa["mode_used"]) == ("app-a", 0.0, "off")
    assert (sb["app"], sb["alpha"], sb["mode_used"]) == ("app-b", 4.0, "dataset")
    assert a.guarded_model.shifts.source.store.namespace == "app-a"
    assert b.guarded_model.shifts.source.store.namespace == "app-b"


def test_stop_sequences_and_settings(tiny_chat):
    full = tiny_chat.invoke([HumanMessage("hello")], max_tokens=12).content
    assert len(full) > 4
    stop = full[2:4]
    stopped = tiny_chat.invoke([HumanMessage("hello")], max_tokens=12, stop=[stop]).content
    assert stopped == full[: full.index(stop)]
    streamed = "".join(
        c.content for c in tiny_chat.stream([HumanMessage("hello")], max_tokens=12, stop=[stop])
    )
    assert streamed == stopped
    with pytest.raises(Exception, match="model override"):
        tiny_chat.invoke([HumanMessage("hello")], model="another-model")


async def test_async_calls_do_not_block_the_event_loop(tiny_chat):
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    result = await tiny_chat.ainvoke([openai_image()], max_tokens=64)
    chunks = [c async for c in tiny_chat.astream([openai_image()], max_tokens=8)]
    done.set()
    await task
    assert result.response_metadata["safety"]["guarded"]
    assert sum(chunks[1:], chunks[0]).response_metadata["safety"]["guarded"]
    assert ticks > 5


# ---------------------------------------------------------------- fail closed


def test_store_outage_fails_closed_or_answers_unguarded_by_choice(tiny_path, own_redis):
    url = f"{own_redis.url}?retries=0"
    own_redis.kill()
    strict = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="strict", mode="dataset", store=url, max_tokens=3
    )
    with pytest.raises(GuardUnavailableError) as info:
        strict.invoke([openai_image()])
    assert any("unreachable" in f for f in info.value.decision.fallbacks)
    lenient = ChatGuardedVLM.from_model_id(
        model=str(tiny_path),
        app="lenient",
        mode="dataset",
        store=url,
        max_tokens=3,
        on_unavailable="unguarded",
    )
    safety = lenient.invoke([openai_image()]).response_metadata["safety"]
    assert safety["mode_used"] == "unguarded" and not safety["guarded"]
    assert "answered unguarded by configuration" in safety["reason"]
    auto = ChatGuardedVLM.from_model_id(model=str(tiny_path), app="auto", store=url, max_tokens=3)
    safety = auto.invoke([openai_image()]).response_metadata["safety"]
    assert safety["mode_used"] == "sample" and safety["guarded"]


# ---------------------------------------------------------------- bad input: typed, one record


def _decisions(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "guardrail.decisions"]


@pytest.mark.parametrize(
    "block, error, match",
    [
        (
            {"type": "image_url", "image_url": {"url": "http://exa\tmple.com/x.png"}},
            InvalidImageError,
            "whitespace or control",
        ),
        (
            {"type": "image_url", "image_url": {"url": "http://example.com/" + "a" * 1_000_000}},
            InvalidImageError,
            "longer than",
        ),
        (
            {"type": "image_url", "image_url": {"url": "http://example.com:99999/x.png"}},
            InvalidImageError,
            "malformed image URL",
        ),
        (
            {"type": "image_url", "image_url": {"url": "http://[::1"}},
            InvalidImageError,
            "malformed image URL",
        ),
        (
            {"type": "image", "base64": 12345, "mime_type": "image/png"},
            InvalidImageError,
            "base64 text",
        ),
        ({"type": "text", "text": "What is <image> this?"}, InvalidInputError, "placeholder"),
    ],
)
def test_each_bad_input_is_a_typed_error_with_exactly_one_record(
    tiny_chat, block, error, match, caplog
):
    message = HumanMessage(content=[block, {"type": "text", "text": "What is it?"}])
    with (
        caplog.at_level(logging.INFO, logger="guardrail.decisions"),
        pytest.raises(error, match=match) as info,
    ):
        tiny_chat.invoke([message])
    assert [d["mode_used"] for d in _decisions(caplog)] == ["refused"]
    assert info.value.decision is not None and info.value.decision.mode_used == "refused"


def test_a_bad_image_in_a_coalesced_batch_gets_one_record_and_the_others_answer(tiny_chat, caplog):
    good = openai_image(PNG)
    bad = openai_image(b"definitely not an image")
    with caplog.at_level(logging.INFO, logger="guardrail.decisions"):
        results = tiny_chat.batch([[good], [bad], [good]], return_exceptions=True)
    assert isinstance(results[1], InvalidImageError)
    assert all(r.response_metadata["safety"]["guarded"] for r in (results[0], results[2]))
    modes = [d["mode_used"] for d in _decisions(caplog)]
    assert modes.count("refused") == 1 and len(modes) == 3


def test_inline_images_have_the_same_byte_cap_as_remote_ones(tiny_path, tmp_path):
    chat = ChatGuardedVLM.from_model_id(
        model=str(tiny_path),
        app="cap",
        store=f"file://{tmp_path}",
        max_tokens=2,
        max_image_bytes=len(PNG) - 1,
    )
    with pytest.raises(InvalidImageError, match="exceeds"):
        chat.invoke([openai_image(PNG)])


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",
        "2002:a00:1::",
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ],
)
def test_ipv6_forms_that_embed_a_private_ipv4_address_are_refused(address):
    with pytest.raises(ImageFetchError, match="non-public"):
        RemoteImageFetcher().fetch(f"http://[{address}]/x.png")


def test_one_deadline_bounds_a_slowly_dripping_answer(image_server):
    fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"], timeout_s=1.0)
    with pytest.raises(ImageFetchError, match="deadline"):
        fetcher.fetch(f"{image_server}/drip.png")  # each byte comes well within a read timeout


@pytest.mark.parametrize("path", ["/drip-status.png", "/drip-headers.png"])
def test_the_deadline_holds_while_the_status_line_or_headers_drip(image_server, path):
    """The deadline used to start only once headers had arrived: a host dripping its status
    line or headers held a 1 s fetch for 20 s."""
    fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"], timeout_s=1.0)
    started = time.perf_counter()
    with pytest.raises(ImageFetchError, match="deadline"):
        fetcher.fetch(f"{image_server}{path}")
    assert time.perf_counter() - started < 1.3


def test_the_deadline_includes_the_dns_lookup(monkeypatch):
    def stalled(*args, **kwargs):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", stalled)
    started = time.perf_counter()
    with pytest.raises(ImageFetchError, match="deadline passed in DNS"):
        RemoteImageFetcher(timeout_s=0.5).fetch("http://images.example/x.png")
    assert time.perf_counter() - started < 0.8


def test_the_connection_goes_to_the_checked_address(image_server, monkeypatch):
    """DNS rebinding: the name answers a permitted address for the check, then another one."""
    port = int(image_server.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1", "127.0.0.2"])
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host != "images.test":
            return real(host, *args, **kwargs)
        address = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"])
    assert fetcher.fetch(f"http://images.test:{port}/img.png") == PNG
    assert _Handler.hosts[-1] == f"images.test:{port}"  # the URL's host, not the address


def test_credentials_are_refused_and_query_strings_never_logged(image_server, caplog):
    fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(ImageFetchError, match="credentials"):
        fetcher.fetch(image_server.replace("http://", "http://user:secret@") + "/img.png")
    with caplog.at_level(logging.DEBUG, logger="httpx"):
        assert fetcher.fetch(f"{image_server}/img.png?token=SECRET-TOKEN") == PNG
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "HTTP Request" in logged and "SECRET-TOKEN" not in logged


def test_the_default_policy_trusts_inline_images_only():
    policy = ByImageSource()
    assert policy.classify(TrustInput(("inline", "app"), lambda: None), None).trusted
    for source in ("remote", "tool"):
        verdict = policy.classify(TrustInput(("inline", source), lambda: None), None)
        assert not verdict.trusted and source in verdict.reason


# ---------------------------------------------------------------- the LLM cache


@pytest.fixture()
def llm_cache():
    cache = InMemoryCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(None)


def test_an_unguarded_answer_is_never_cached_for_a_fail_closed_instance(
    tiny_path, own_redis, llm_cache
):
    url = f"{own_redis.url}?retries=0"
    own_redis.kill()
    common = dict(model=str(tiny_path), app="cache", mode="dataset", store=url, max_tokens=3)
    lenient = ChatGuardedVLM.from_model_id(**common, on_unavailable="unguarded")
    assert lenient.invoke([openai_image()]).response_metadata["safety"]["mode_used"] == "unguarded"
    assert llm_cache._cache == {}  # not written
    strict = ChatGuardedVLM.from_model_id(**common)
    with pytest.raises(GuardUnavailableError):
        strict.invoke([openai_image()])


def test_the_cache_key_covers_the_guard_and_a_hit_is_a_new_logged_decision(
    tiny_path, tmp_path, llm_cache, caplog
):
    store = f"file://{tmp_path}"
    one = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="c", store=store, max_tokens=3, layers=(1,)
    )
    two = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="c", store=store, max_tokens=3, layers=(2,)
    )
    three = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="c", store=store, max_tokens=4, layers=(1,)
    )
    first = one.invoke([openai_image()]).response_metadata["safety"]
    assert two.invoke([openai_image()]).response_metadata["safety"]["layers"] == [2]
    three.invoke([openai_image()])
    assert len(llm_cache._cache) == 3  # other layers, other max_tokens: other keys
    with caplog.at_level(logging.INFO, logger="guardrail.decisions"):
        again = one.invoke([openai_image()]).response_metadata["safety"]
    assert again["call_id"] != first["call_id"] and again["layers"] == [1]
    assert any("replayed from the LLM cache" in f for f in again["fallbacks"])
    assert [d["call_id"] for d in _decisions(caplog)] == [again["call_id"]]


# ---------------------------------------------------------------- streaming


class _Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.names: list[str] = []

    def on_custom_event(self, name, data, **kwargs) -> None:
        self.names.append(name)


def test_streaming_inside_a_run_sends_the_decision_event(tiny_chat):
    """LangGraph nodes and agents stream the model inside a run: the event reaches the run's
    callbacks once."""
    events = _Events()
    node = RunnableLambda(lambda messages: "".join(c.content for c in tiny_chat.stream(messages)))
    node.invoke([openai_image()], config={"callbacks": [events]})
    assert events.names == ["guardrail_decision"]


def test_closing_a_stream_stops_generation(tiny_path, tmp_path):
    chat = ChatGuardedVLM.from_model_id(
        model=str(tiny_path), app="close", store=f"file://{tmp_path}", max_tokens=200
    )
    passes: list[int] = []
    embeddings = chat.guarded_model.model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda *args: passes.append(1))
    try:
        stream = chat.stream([openai_image()])
        next(stream)
        stream.close()  # the consumer goes away after its first chunk
    finally:
        handle.remove()
    assert 0 < len(passes) < 200  # one pass per generated token, stopped early


# ---------------------------------------------------------------- call settings and metadata


def test_unknown_arguments_are_refused_with_one_record(tiny_chat, caplog):
    with (
        caplog.at_level(logging.INFO, logger="guardrail.decisions"),
        pytest.raises(InvalidInputError, match=r"unsupported argument.*frobnicate"),
    ):
        tiny_chat.invoke([openai_image()], frobnicate=True)
    assert [d["mode_used"] for d in _decisions(caplog)] == ["refused"]


def test_seed_and_top_k_are_honoured(tiny_chat):
    def sample(seed: int) -> str:
        return tiny_chat.invoke(
            [openai_image()], temperature=1.5, top_k=50, seed=seed, max_tokens=12
        ).content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1  # the seed really changes the draw


def test_finish_reason_provider_and_langsmith_params(tiny_chat):
    metadata = tiny_chat.invoke([openai_image()], max_tokens=3).response_metadata
    assert metadata["finish_reason"] in ("stop", "length")
    assert metadata["model_provider"] == "cmrm-guardrail"
    short = tiny_chat.invoke([openai_image()], max_tokens=1)
    assert short.response_metadata["finish_reason"] == "length"  # cut by max_tokens
    assert short.usage_metadata["output_tokens"] == 1
    params = tiny_chat._get_ls_params(max_tokens=9, temperature=0.3)
    assert (params["ls_max_tokens"], params["ls_temperature"]) == (9, 0.3)


def test_token_counts_use_the_models_own_tokenizer(tiny_chat):
    text = "what is the picture"
    expected = tiny_chat.guarded_model.tokenizer.encode(text, add_special_tokens=False)
    assert tiny_chat.get_token_ids(text) == expected
    assert tiny_chat.get_num_tokens(text) == len(expected) > 0


def test_a_remote_image_in_the_history_is_not_fetched_every_turn(image_server):
    url = f"{image_server}/img.png?turns"
    before = len(_Handler.hosts)
    fetcher = RemoteImageFetcher(allow_networks=["127.0.0.1/32"])
    assert fetcher.fetch(url) == fetcher.fetch(url) == PNG
    assert len(_Handler.hosts) == before + 1  # the second turn reused the first fetch
    forgetful = RemoteImageFetcher(allow_networks=["127.0.0.1/32"], reuse_s=0)
    forgetful.fetch(url)
    forgetful.fetch(url)
    assert len(_Handler.hosts) == before + 3


def test_guard_errors_are_also_langchains_provider_neutral_exceptions(
    tiny_chat, tiny_path, tmp_path
):
    from langchain_core.exceptions import ModelAPIError, ModelInvalidRequestError

    bad = HumanMessage(content=[{"type": "image", "base64": "@@@", "mime_type": "image/png"}])
    with pytest.raises(InvalidImageError) as info:
        tiny_chat.invoke([bad])
    assert isinstance(info.value, ModelInvalidRequestError)
    assert info.value.decision is not None and info.value.decision.mode_used == "refused"
    empty = f"file://{tmp_path}"  # not calibrated: mode=dataset fails closed
    closed = ChatGuardedVLM(model=str(tiny_path), app="closed", mode="dataset", store=empty)
    with pytest.raises(GuardUnavailableError) as unavailable:
        closed.invoke([openai_image()])
    assert isinstance(unavailable.value, ModelAPIError) and unavailable.value.is_retryable
    assert unavailable.value.decision.mode_used == "unguarded"


def test_a_cache_set_after_construction_is_guarded_too(tiny_chat):
    copy = tiny_chat.model_copy()
    copy.cache = InMemoryCache()
    assert isinstance(copy.cache, GuardedCache)
    copy.cache = False
    assert copy.cache is False


def test_a_copy_with_changed_guard_settings_runs_with_them(tiny_chat):
    copied = tiny_chat.model_copy(update={"alpha": 0.3, "on_unavailable": "unguarded"})
    assert (copied.guard.alpha, copied.guard.on_unavailable) == (0.3, "unguarded")
    assert copied.invoke([openai_image()]).response_metadata["safety"]["alpha"] == 0.3
    assert tiny_chat.invoke([openai_image()]).response_metadata["safety"]["alpha"] == 1.0


def test_the_chat_model_round_trips_through_langchains_serialization(tiny_chat):
    """loads(dumps(chat)) raised NotImplementedError. The settings are written (the guard config
    as plain values, the model by name), never the loaded model or the cache: the copy loads the
    same shared model, answers the same, and still wraps its cache."""
    from langchain_core.load import dumps, loads

    strict = tiny_chat.model_copy(update={"alpha": 0.5, "on_unavailable": "fail_closed"})
    text = dumps(strict)
    assert '"alpha": 0.5' in text and "GuardedCache" not in text
    copy = loads(text, valid_namespaces=["adapters"], allowed_objects=[ChatGuardedVLM])
    assert copy.guard == strict.guard and copy.service is strict.service
    assert isinstance(copy.cache, GuardedCache)
    assert copy.invoke([openai_image()]).content == strict.invoke([openai_image()]).content
    custom = tiny_chat.model_copy(update={"trust_policy": ByImageSource(("app",))})
    assert json.loads(dumps(custom))["type"] == "not_implemented"
