"""A fingerprint names the checkpoint's files, not the runtime that loaded them."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from guardrail import GuardedVLM
from guardrail.backends.fingerprint import fingerprint_checkpoint, fingerprint_model
from guardrail.errors import GuardrailError
from guardrail.service import GuardService


def test_renamed_tensors_keep_the_fingerprint_and_changed_values_do_not(tiny_path, tmp_path):
    original = fingerprint_checkpoint(str(tiny_path), 4, 64)
    renamed, edited = tmp_path / "renamed", tmp_path / "edited"
    for copy in (renamed, edited):
        shutil.copytree(tiny_path, copy)
    file = renamed / "model.safetensors"
    save_file({f"runtime.{k}": v for k, v in load_file(file).items()}, file)
    tensors = load_file(edited / "model.safetensors")
    name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, edited / "model.safetensors")
    assert original is not None
    assert fingerprint_checkpoint(str(renamed), 4, 64).weights_hash == original.weights_hash
    assert fingerprint_checkpoint(str(edited), 4, 64).weights_hash != original.weights_hash


def test_a_model_changed_in_memory_does_not_claim_its_files_fingerprint(tiny_path):
    vlm = GuardedVLM.from_pretrained(str(tiny_path))
    model = vlm.backend.model
    files = fingerprint_checkpoint(str(tiny_path), vlm.backend.num_layers, vlm.backend.hidden_size)
    assert vlm.fingerprint == files  # loaded as saved: the files' fingerprint
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1e-2)
    changed = fingerprint_model(model, vlm.backend.num_layers, vlm.backend.hidden_size)
    assert changed.weights_hash != files.weights_hash


def test_the_vllm_backend_without_vllm_says_how_to_install_it(tiny_path):
    with pytest.raises(GuardrailError, match=r"pip install 'cmrm-guardrail\[vllm\]'"):
        GuardService.from_pretrained(str(tiny_path), backend="vllm")
