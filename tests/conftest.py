"""Shared fixtures: the tiny and SmolLM2-backed LLaVA checkpoints, built once and cached."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis
import torch

from guardrail import GuardConfig, GuardedVLM
from guardrail.testing import anchor_prompts, fixture_path, synthetic_image
from tests.helpers import SHARED_REDIS

torch.set_num_threads(2)

# The vLLM backend's tests need vLLM, which lives in an environment of its own (.venv-vllm):
# `make test` runs them there, after this suite.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

# Real weights, model training, Ray clusters and example scripts: `pytest -m "not slow"` skips
# them for a quick run (CI runs everything).
_SLOW_FIXTURES = {"smollm_path", "smollm_vlm", "plain_smollm"}
_SLOW_MODULES = {"test_organism", "test_server_ray", "test_examples", "test_langchain_standard"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_path():
    return fixture_path("tiny")


@pytest.fixture(scope="session")
def smollm_path():
    return fixture_path("smollm")


@pytest.fixture(scope="session")
def tiny_vlm(tiny_path) -> GuardedVLM:
    return GuardedVLM.from_pretrained(str(tiny_path))


@pytest.fixture(scope="session")
def smollm_vlm(smollm_path) -> GuardedVLM:
    return GuardedVLM.from_pretrained(str(smollm_path), config=GuardConfig())


@pytest.fixture()
def image():
    return synthetic_image(1, (200, 150))


# ---------------------------------------------------------------- Redis (real servers only)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process of the test session's own, on a free port; can be killed and
    restarted on the same port (it keeps nothing on disk)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required (.ci/run installs it)"
        self.binary, self.port = binary, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture()
def own_redis():
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture()
def namespace():
    """A namespace of this test's own on the shared Redis server, removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = list(client.scan_iter(f"cmrm:{name}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture()
def data(tmp_path):
    """A VLSafe-style JSONL file of four anchor questions with their COCO-style images."""
    images = tmp_path / "coco"
    images.mkdir()
    for i in range(4):
        synthetic_image(i, (48, 48)).save(images / f"{i:03d}.jpg")
    rows = [
        {"image_id": f"{i:03d}.jpg", "caption": "shapes on a gradient", "query": q}
        for i, q in enumerate(anchor_prompts()[:4])
    ]
    vlsafe = tmp_path / "vlsafe.jsonl"
    vlsafe.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, images, vlsafe
