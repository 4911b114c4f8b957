"""The OpenAI-compatible server, driven by clients no one here wrote: the openai SDK and
LangChain's ChatOpenAI, against a server on a loopback port."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import httpx
import openai
import pytest
import uvicorn
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from adapters.server import AppSettings, ServerSettings, create_app, hash_key

from .test_adapter import PNG, _Handler

DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
IMAGE_MESSAGE = {
    "role": "user",
    "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": DATA_URL}},
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until ``url/healthz`` answers 200 (the server process must stay alive meanwhile)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline and process.poll() is None, "server did not become ready"
        time.sleep(0.3)


class Served:
    """A server in a thread of the test process, on a free loopback port."""

    def __init__(self, settings: ServerSettings, runner=None) -> None:
        self.settings = settings.model_copy(update={"port": _free_port()})
        config = uvicorn.Config(
            create_app(self.settings, runner=runner),
            host="127.0.0.1",
            port=self.settings.port,
            log_level="error",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("served")
    settings = ServerSettings(
        model=str(tiny_path),
        store=f"file://{store}",
        apps=(
            AppSettings(name="alpha", key_sha256=hash_key("key-a"), max_tokens=64),
            AppSettings(
                name="beta",
                key_sha256=hash_key("key-b"),
                alpha=0.5,
                max_concurrent=1,
                max_tokens=256,
                max_request_bytes=200_000,
            ),
            AppSettings(name="hurried", key_sha256=hash_key("key-h"), max_request_s=0.3),
        ),
    )
    server = Served(settings)
    yield server
    server.stop()


def _ask(served: Served, key: str = "key-a", **options):
    options.setdefault("max_tokens", 4)
    return served.client(key).chat.completions.create(
        model=served.settings.model, messages=[IMAGE_MESSAGE], **options
    )


# ---------------------------------------------------------------- the openai SDK


def test_openai_sdk_plain_call_with_an_image(served):
    raw = served.client("key-a").chat.completions.with_raw_response.create(
        model=served.settings.model, messages=[IMAGE_MESSAGE], max_tokens=4
    )
    answer = raw.parse()
    safety = answer.model_extra["safety"]
    assert safety["app"] == "alpha" and safety["guarded"] and safety["mode_used"] == "dataset"
    assert raw.headers["x-guardrail-call-id"] == safety["call_id"]
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 4 and answer.usage.prompt_tokens > 0


def test_openai_sdk_streaming(served):
    stream = _ask(served, stream=True, max_tokens=8, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    safety = last.model_extra["safety"]
    assert safety["mode_used"] == "dataset" and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 8
    plain = _ask(served, max_tokens=8)
    assert text == plain.choices[0].message.content  # greedy: the same answer either way


def test_min_tokens_holds_the_stop_token_back(served):
    """vLLM's ``min_tokens`` extension: the answer runs to ``max_tokens`` whatever the model
    would have stopped at (and never past it)."""
    answer = _ask(served, max_tokens=12, extra_body={"min_tokens": 12})
    assert answer.usage.completion_tokens == 12 and answer.choices[0].finish_reason == "length"
    capped = _ask(served, max_tokens=3, extra_body={"min_tokens": 50})
    assert capped.usage.completion_tokens == 3


def test_text_only_and_per_app_settings(served):
    answer = served.client("key-b").chat.completions.create(
        model=served.settings.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.model_extra["safety"]["mode_used"] == "text-only"
    beta = _ask(served, "key-b").model_extra["safety"]
    assert (beta["app"], beta["alpha"]) == ("beta", 0.5)


def test_the_api_schema_and_its_pages_are_off_unless_enabled(served, tiny_path):
    for page in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{served.url}{page}").status_code == 404
    enabled = ServerSettings.development_mode(str(tiny_path), docs=True)
    assert "/openapi.json" in {route.path for route in create_app(enabled).routes}


def test_models_health_and_metrics(served):
    models = served.client("key-a").models.list()
    assert [m.id for m in models.data] == [served.settings.model]
    health = httpx.get(f"{served.url}/healthz").json()
    assert health["status"] == "ok" and set(health["apps"]) == {"alpha", "beta", "hurried"}
    before = _metric(served, 'guardrail_calls_total{app="alpha",mode_used="dataset"}')
    _ask(served)
    after = _metric(served, 'guardrail_calls_total{app="alpha",mode_used="dataset"}')
    assert after == before + 1
    assert _metric(served, 'guardrail_store_lookups_total{app="alpha",result="found"}') >= 1
    assert _metric(served, 'guardrail_tokens_total{app="alpha",kind="completion"}') >= 1


def _metric(served: Served, name: str) -> float:
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------- keys, limits, bad input


def test_missing_or_wrong_keys_are_401_and_no_request_reaches_another_app(served):
    for key in ("key-c", "KEY-A"):
        with pytest.raises(openai.AuthenticationError):
            _ask(served, key)
    body = {"model": served.settings.model, "messages": [IMAGE_MESSAGE]}
    assert httpx.post(f"{served.url}/v1/chat/completions", json=body).status_code == 401
    with pytest.raises(openai.BadRequestError, match="app"):  # a field cannot pick an app
        _ask(served, "key-a", extra_body={"app": "beta"})
    assert _ask(served, "key-a").model_extra["safety"]["app"] == "alpha"


def test_over_the_concurrency_limit_is_429_with_retry_after(served):
    def slow():
        return _ask(served, "key-b", max_tokens=200)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(slow)
        time.sleep(0.3)
        response = httpx.post(
            f"{served.url}/v1/chat/completions",
            headers={"Authorization": "Bearer key-b"},
            json={"model": served.settings.model, "messages": [IMAGE_MESSAGE], "max_tokens": 2},
        )
        assert first.result().model_extra["safety"]["app"] == "beta"
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert _ask(served, "key-b").model_extra["safety"]["app"] == "beta"  # the slot came back


def test_generation_stops_at_the_apps_deadline(served):
    started = time.perf_counter()
    answer = _ask(served, "key-h", max_tokens=1000)
    assert time.perf_counter() - started < 2.0  # 1000 tiny-model tokens take about 5 s
    assert answer.choices[0].finish_reason == "length"
    assert 0 < answer.usage.completion_tokens < 1000


def test_bad_input_is_400_with_the_typed_message(served):
    broken = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
    }
    with pytest.raises(openai.BadRequestError) as caught:
        served.client("key-a").chat.completions.create(
            model=served.settings.model, messages=[broken], max_tokens=2
        )
    body = caught.value.body
    assert body["message"].startswith("InvalidImageError:")
    assert caught.value.response.json()["safety"]["mode_used"] == "refused"
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        _ask(served, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        _ask(served, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="n"):
        _ask(served, n=17)
    with pytest.raises(openai.BadRequestError, match=r"seed must be in") as caught:
        _ask(served, seed=2**80, temperature=0.7)
    assert caught.value.response.json()["safety"]["mode_used"] == "refused"
    with pytest.raises(openai.NotFoundError):
        served.client("key-a").chat.completions.create(
            model="gpt-4o", messages=[IMAGE_MESSAGE], max_tokens=2
        )
    split = [{"type": "text", "text": "What is <ima"}, {"type": "text", "text": "ge> this?"}]
    with pytest.raises(openai.BadRequestError, match="reserved placeholder") as caught:
        served.client("key-a").chat.completions.create(
            model=served.settings.model, messages=[{"role": "user", "content": split}]
        )
    assert caught.value.response.json()["safety"]["mode_used"] == "refused"
    with pytest.raises(openai.BadRequestError, match="response_format") as caught:
        _ask(served, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert caught.value.response.json()["safety"]["mode_used"] == "refused"
    with pytest.raises(openai.BadRequestError, match="OpenAI function definition") as caught:
        _ask(served, tools=[{"type": "function"}], tool_choice="auto")  # a KeyError, HTTP 500
    assert caught.value.response.json()["safety"]["mode_used"] == "refused"
    big = {"role": "user", "content": "x" * 300_000}
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        headers={"Authorization": "Bearer key-b"},
        json={"model": served.settings.model, "messages": [big]},
    )
    assert response.status_code == 413


def test_hostile_bodies_get_typed_400s_and_never_a_500(served):
    """Tool-call arguments nested 5000 deep (a RecursionError, HTTP 500 before) and a body
    nested deeper than the parser allows."""
    deep = "[" * 5000 + "]" * 5000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    headers = {"Authorization": "Bearer key-a"}
    answer = httpx.post(
        f"{served.url}/v1/chat/completions",
        headers=headers,
        json={"model": served.settings.model, "messages": messages, "max_tokens": 2},
    )
    assert answer.status_code == 400 and "nested too deeply" in answer.json()["error"]["message"]
    nested = '{"model": "m", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    answer = httpx.post(
        f"{served.url}/v1/chat/completions",
        headers={**headers, "content-type": "application/json"},
        content=nested,
    )
    assert answer.status_code == 400 and "recursion limit" in answer.json()["error"]["message"]


def test_a_chunked_body_is_cut_off_at_the_limit_not_read_whole(served):
    """200 MB sent without a length to an app that takes 200 kB: refused once 200 kB have
    arrived; the server's memory does not grow by the body (it did by 400 MB)."""

    def body():
        for _ in range(2000):
            yield b"x" * 100_000

    before = _rss_mb()
    try:
        answer = httpx.post(
            f"{served.url}/v1/chat/completions",
            headers={"Authorization": "Bearer key-b"},
            content=body(),
            timeout=30,
        )
        assert answer.status_code == 413
    except httpx.TransportError:
        pass  # the server may close the connection on a body it refused mid-way
    assert _rss_mb() - before < 60


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_the_store_address_never_reaches_api_callers(tiny_path):
    settings = ServerSettings(
        model=str(tiny_path),
        store="redis://127.0.0.1:1/0?socket_connect_timeout=0.2&retries=0",
        apps=(AppSettings(name="a", key_sha256=hash_key("k"), max_tokens=4),),
    )
    server = Served(settings)
    try:
        answer = server.client("k").chat.completions.with_raw_response.create(
            model=settings.model, messages=[IMAGE_MESSAGE], max_tokens=2
        )
        safety = answer.http_response.json()["safety"]
        assert safety["mode_used"] == "sample" and "store unreachable" in safety["fallbacks"][0]
        assert "127.0.0.1" not in answer.http_response.text
        assert ":1" not in " ".join(safety["fallbacks"])
    finally:
        server.stop()


def test_images_that_drip_cannot_hold_a_request_past_its_deadline(tiny_path):
    """Three image URLs whose host drips its status line (5 s each): the request still ends
    within its 1.5 s, and its slot (the app has one) is free for the next request. Before, each
    fetch had its own deadline, counted from the headers, and the request took 25 s."""
    images = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}/drip-status.png"
    settings = ServerSettings(
        model=str(tiny_path),
        images={"allow_networks": ["127.0.0.1/32"]},
        apps=(
            AppSettings(name="a", key_sha256=hash_key("k"), max_request_s=1.5, max_concurrent=1),
        ),
    )
    server = Served(settings)
    parts = [{"type": "image_url", "image_url": {"url": url}}] * 3
    try:
        started = time.perf_counter()
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": "Bearer k"},
            json={"model": settings.model, "messages": [{"role": "user", "content": parts}]},
            timeout=30,
        )
        assert time.perf_counter() - started < 2.0
        assert answer.status_code in (400, 504) and "deadline" in answer.text
        assert server.client("k").chat.completions.create(
            model=settings.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    finally:
        server.stop()
        images.shutdown()


def test_fail_closed_is_503_with_its_decision(tiny_path):
    settings = ServerSettings(
        model=str(tiny_path),
        store="redis://127.0.0.1:1/0",  # nothing listens: no dataset-level shift
        apps=(AppSettings(name="strict", key_sha256=hash_key("k"), mode="dataset"),),
    )
    server = Served(settings)
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            _ask(server, "k")
        assert caught.value.status_code == 503
        body = caught.value.response.json()
        assert body["safety"]["mode_used"] == "unguarded" and not body["safety"]["guarded"]
        assert caught.value.response.headers["x-guardrail-call-id"] == body["safety"]["call_id"]
        assert (
            "sample-level fallback" in httpx.get(f"{server.url}/healthz").json()["apps"]["strict"]
        )
    finally:
        server.stop()


@contextlib.contextmanager
def _forward_passes(served: Served):
    """The served model's forward passes, counted while the block runs."""
    from guardrail.registry import shared_service

    chat_model = shared_service(served.settings.model, None, None, None).model
    passes: list[int] = []
    handle = chat_model.model.get_input_embeddings().register_forward_hook(
        lambda *args: passes.append(1)
    )
    try:
        yield passes
    finally:
        handle.remove()


LONG_ANSWER = {"messages": [IMAGE_MESSAGE], "max_tokens": 250}


def test_a_client_that_disconnects_mid_stream_stops_its_generation(served):
    with _forward_passes(served) as passes:
        with httpx.stream(
            "POST",
            f"{served.url}/v1/chat/completions",
            headers={"Authorization": "Bearer key-b"},
            json={"model": served.settings.model, **LONG_ANSWER, "stream": True},
        ) as response:
            next(response.iter_lines())
        time.sleep(1.0)
        seen = len(passes)
        time.sleep(0.5)
    assert 0 < seen < 250 and len(passes) == seen  # stopped early, and stays stopped


def test_a_non_streamed_call_stops_when_its_client_gives_up(served):
    """A client that times out on a non-streamed call used to leave its generation running
    and its slot (beta has one) taken until the answer was complete."""
    with _forward_passes(served) as passes:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{served.url}/v1/chat/completions",
                headers={"Authorization": "Bearer key-b"},
                json={"model": served.settings.model, **LONG_ANSWER},
                timeout=httpx.Timeout(10, read=0.5),
            )
        time.sleep(0.5)
        seen = len(passes)
        time.sleep(0.5)
    assert 0 < seen < 250 and len(passes) == seen  # stopped early, and stays stopped
    assert _ask(served, key="key-b", max_tokens=2).choices  # the slot is free again


# ---------------------------------------------------------------- LangChain's ChatOpenAI


def test_chat_openai_against_the_server(served):
    chat = ChatOpenAI(
        model=served.settings.model, base_url=f"{served.url}/v1", api_key="key-a", max_tokens=4
    )
    answer = chat.invoke([HumanMessage(content=IMAGE_MESSAGE["content"])])
    assert isinstance(answer.content, str) and answer.response_metadata["finish_reason"]
    streamed = "".join(c.content for c in chat.stream("hello"))
    assert streamed == chat.invoke("hello").content


@tool
def ping() -> str:
    """Check the service."""
    return "pong"


def test_create_agent_with_chat_openai_and_tools(served):
    @wrap_model_call
    def first_call_pings(request, handler):
        used = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if used else "ping"))

    chat = ChatOpenAI(
        model=served.settings.model, base_url=f"{served.url}/v1", api_key="key-b", max_tokens=120
    )
    agent = create_agent(model=chat, tools=[ping], middleware=[first_call_pings])
    out = agent.invoke({"messages": [HumanMessage(content=IMAGE_MESSAGE["content"])]})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert out["messages"][1].tool_calls[0]["name"] == "ping"
    assert out["messages"][2].content == "pong"


# ---------------------------------------------------------------- the command, and SIGTERM


def test_guardrail_serve_drains_in_flight_requests_on_sigterm(tiny_path, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guardrail.cli",
            "serve",
            "--model",
            str(tiny_path),
            "--store",
            f"file://{tmp_path}",
            "--port",
            str(port),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process)
        body = {"model": str(tiny_path), "messages": [IMAGE_MESSAGE], "max_tokens": 250}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] > 0
        # uvicorn re-raises the signal once it has shut down gracefully
        assert process.wait(60) in (0, -signal.SIGTERM)
        log = process.stderr.read()
        assert "development mode" in log
        safety = response.json()["safety"]
        assert safety["guarded"] and safety["call_id"] in log  # guarded decisions are logged too
    finally:
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------- settings


def test_settings_from_a_config_file(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(
        'model = "m"\nstore = "redis://cache:6379/0"\n\n'
        f'[apps.support]\nkey_sha256 = "{hash_key("s3cret")}"\nalpha = 0.8\n\n'
        f'[apps.search]\nkey_sha256 = "{hash_key("other")}"\nnamespace = "search-v2"\n'
    )
    settings = ServerSettings.from_toml(config, port=9000)
    assert [a.name for a in settings.apps] == ["support", "search"] and settings.port == 9000
    assert settings.app_for("s3cret").guard.alpha == 0.8 and settings.app_for("S3CRET") is None
    assert settings.app_for("other").store_namespace == "search-v2"
    assert settings.app_for(None) is None and "s3cret" not in config.read_text()


@pytest.mark.parametrize(
    "values, error",
    [
        ({"apps": [{"name": "a"}]}, "needs a key_sha256"),
        ({"apps": [{"name": "a", "key_sha256": "x"}, {"name": "b", "key_sha256": "x"}]}, "share"),
        ({"apps": [{"name": "a", "key_sha256": "x"}, {"name": "a", "key_sha256": "y"}]}, "once"),
        ({"store": "redis://h/0?namespace=n", "apps": [{"name": "a", "key_sha256": "x"}]}, "own"),
        ({"development": True, "host": "0.0.0.0", "apps": [{"name": "default"}]}, "loopback"),
    ],
)
def test_unsafe_settings_are_refused(values, error):
    with pytest.raises(ValueError, match=error):
        ServerSettings.model_validate({"model": "m", **values})
