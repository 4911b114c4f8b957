"""Shared fixtures: the tiny and SmolLM2-backed LLaVA checkpoints, built once and cached."""

from __future__ import annotations

import pytest
import torch

from guardrail import GuardConfig, GuardedVLM
from guardrail.testing import fixture_path, synthetic_image

torch.set_num_threads(2)


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
