"""Model fingerprints: which checkpoint a shift vector was computed on."""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel

from shift_store import ModelFingerprint

_SAMPLES_PER_TENSOR = 64
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "dtype"}


def _config_hash(model: PreTrainedModel) -> str:
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def _weights_hash(model: PreTrainedModel) -> str:
    """Hash of a strided sample of every parameter (cheap even for 7B models on a GPU).

    Any fine-tune or re-initialisation changes the sampled values; hashing every byte of a
    multi-GB checkpoint at each start would cost seconds to minutes.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_model(
    model: PreTrainedModel, num_layers: int, hidden_size: int
) -> ModelFingerprint:
    """Fingerprint ``model`` from its name, hub revision, config and sampled weights."""
    return ModelFingerprint(
        name_or_path=str(model.config.name_or_path or type(model).__name__),
        revision=getattr(model.config, "_commit_hash", None),
        weights_hash=_weights_hash(model),
        config_hash=_config_hash(model),
        num_layers=num_layers,
        hidden_size=hidden_size,
    )
