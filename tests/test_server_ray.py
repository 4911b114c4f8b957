"""The server scaled out on Ray Serve: a local Ray instance started by the test, two model
replicas on CPU, Ray Serve's own batching, the same OpenAI API in front."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import ray
from ray import serve

from adapters.langchain import ChatGuardedVLM
from adapters.server import AppSettings, ServerSettings, hash_key
from adapters.server.ray_serve import application

from .test_server import IMAGE_MESSAGE, _free_port, wait_until_healthy


@pytest.fixture(scope="module")
def ray_served(tiny_path, tmp_path_factory):
    store = tmp_path_factory.mktemp("ray")
    port = _free_port()
    settings = ServerSettings(
        model=str(tiny_path),
        store=f"file://{store}",
        apps=(AppSettings(name="fleet", key_sha256=hash_key("k"), max_concurrent=32),),
    )
    # calibrate first (as a deployment would), so that every replica finds the shift stored
    ChatGuardedVLM.from_model_id(model=settings.model, store=settings.store, app="fleet")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings, replicas=2), route_prefix="/", name="guardrail")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        yield settings, client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_answers_and_streams_through_the_replicas(ray_served):
    settings, client = ray_served
    answer = client.chat.completions.create(
        model=settings.model, messages=[IMAGE_MESSAGE], max_tokens=6
    )
    safety = answer.model_extra["safety"]
    assert safety["app"] == "fleet" and safety["mode_used"] == "dataset" and safety["guarded"]
    chunks = list(
        client.chat.completions.create(
            model=settings.model, messages=[IMAGE_MESSAGE], max_tokens=6, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: the same answer either way
    assert chunks[-1].model_extra["safety"]["mode_used"] == "dataset"


def test_concurrent_calls_are_batched_by_ray_serve(ray_served):
    settings, client = ray_served

    def ask(i: int):
        return client.chat.completions.create(
            model=settings.model, messages=[IMAGE_MESSAGE], max_tokens=4
        )

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(24)))
    rows = [a.model_extra["safety"]["batch_rows"] for a in answers]
    assert all(a.model_extra["safety"]["guarded"] for a in answers)
    assert max(rows) > 1  # @serve.batch put several requests in one guarded pass


def test_typed_errors_cross_the_replica_boundary(ray_served):
    settings, client = ray_served
    broken = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=settings.model, messages=[broken], max_tokens=2)
    assert caught.value.body["message"].startswith("InvalidImageError:")
    assert caught.value.response.json()["safety"]["mode_used"] == "refused"


def test_guardrail_serve_with_replicas_starts_answers_and_stops(tiny_path, tmp_path):
    """The command starts its own local Ray, serves, and shuts down cleanly on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "guardrail.cli",
        "serve",
        "--model",
        str(tiny_path),
        "--replicas",
        "1",
        "--port",
        str(port),
        "--store",
        f"file://{tmp_path}",
    ]
    process = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        body = {"model": str(tiny_path), "messages": [IMAGE_MESSAGE], "max_tokens": 3}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["safety"]["guarded"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
