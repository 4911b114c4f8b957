"""Model fingerprints: which checkpoint a shift vector was computed on.

A fingerprint names the *checkpoint*, not the runtime that loaded it: transformers and vLLM
load the same files under different parameter names (vLLM fuses q/k/v and gate/up projections),
so a vector calibrated on one must be found and accepted on the other. When the model was loaded
from safetensors files (a folder, or a snapshot in the local hub cache), the hash is taken from
those files, name-independently; only a model built in memory falls back to its loaded state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from shift_store import ModelFingerprint

_SAMPLED_ROWS = 8
_SAMPLES_PER_ROW = 8
_SAMPLES_PER_TENSOR = 64
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "_commit_hash",
    "dtype",
    "torch_dtype",
}


def checkpoint_folder(name_or_path: str, revision: str | None = None) -> Path | None:
    """The local folder holding ``name_or_path``'s files: the path itself, or its snapshot in
    the local hub cache (never downloaded); None when there is none."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # not a hub id, or not in the cache: no files to read
        return None


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _config_digest(config: dict[str, Any]) -> str:
    blob = json.dumps(_stable(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sampled_rows(shape: tuple[int, ...], row: Any) -> list[torch.Tensor]:
    """Up to 8 evenly spaced rows (``row(i)``), 8 values each, of a tensor of ``shape``."""
    if not shape:
        return [row(None).reshape(-1)]
    step = max(1, shape[0] // _SAMPLED_ROWS)
    indices = list(range(0, shape[0], step))[:_SAMPLED_ROWS]
    return [row(i).reshape(-1)[:_SAMPLES_PER_ROW] for i in indices]


def _digest(shape: tuple[int, ...], rows: list[torch.Tensor], dtype: torch.dtype) -> bytes:
    digest = hashlib.sha256(repr(shape).encode())
    for row in rows:
        digest.update(row.to(dtype).to(torch.float32).numpy().tobytes())
    return digest.digest()


def _file_samples(folder: Path) -> list[tuple[tuple[int, ...], list[torch.Tensor]]]:
    samples = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                part = handle.get_slice(name)
                shape = tuple(part.get_shape())

                def row(i: int | None, name: str = name, part: Any = part) -> torch.Tensor:
                    picked: torch.Tensor = handle.get_tensor(name) if i is None else part[i : i + 1]
                    return picked

                samples.append((shape, _sampled_rows(shape, row)))
    return samples


@torch.no_grad()
def _loaded_digests(model: PreTrainedModel) -> set[bytes]:
    """bfloat16-rounded sample digests of the loaded parameters, to check that the files on
    disk are what is loaded (not edited or fine-tuned in memory since)."""
    digests = set()
    for tensor in model.state_dict().values():
        shape = tuple(tensor.shape)
        rows = _sampled_rows(shape, lambda i, t=tensor: t if i is None else t[i : i + 1])
        digests.add(_digest(shape, [r.detach().cpu() for r in rows], torch.bfloat16))
    return digests


@torch.no_grad()
def _state_weights_hash(model: PreTrainedModel) -> str:
    """Hash of a strided sample of every loaded parameter (a model without files)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_checkpoint(
    name_or_path: str,
    num_layers: int,
    hidden_size: int,
    revision: str | None = None,
    loaded: PreTrainedModel | None = None,
) -> ModelFingerprint | None:
    """Fingerprint of the checkpoint files of ``name_or_path``, whichever runtime loads them
    (8 sampled rows of every tensor); None when no local safetensors files are found, or when
    ``loaded`` (the model in memory) does not hold what the files hold."""
    folder = checkpoint_folder(name_or_path, revision)
    if folder is None or not (folder / "config.json").is_file():
        return None
    samples = _file_samples(folder)
    if not samples:
        return None
    if loaded is not None and not {
        _digest(shape, rows, torch.bfloat16) for shape, rows in samples
    } <= _loaded_digests(loaded):
        return None
    # name-independent: a renamed or resharded copy of the same tensors has the same hash
    digests = sorted(_digest(shape, rows, torch.float32) for shape, rows in samples)
    weights = hashlib.sha256(b"".join(digests)).hexdigest()[:16]
    config = json.loads((folder / "config.json").read_text())
    return ModelFingerprint(
        name_or_path=name_or_path,
        revision=revision,
        weights_hash=weights,
        config_hash=_config_digest(config),
        num_layers=num_layers,
        hidden_size=hidden_size,
    )


def fingerprint_model(
    model: PreTrainedModel, num_layers: int, hidden_size: int
) -> ModelFingerprint:
    """Fingerprint ``model``: from its checkpoint files when it was loaded from some (see
    :func:`fingerprint_checkpoint`), else from its config and sampled loaded weights."""
    name = str(model.config.name_or_path or type(model).__name__)
    revision = getattr(model.config, "_commit_hash", None)
    from_files = fingerprint_checkpoint(name, num_layers, hidden_size, revision, loaded=model)
    if from_files is not None:
        return from_files
    return ModelFingerprint(
        name_or_path=name,
        revision=revision,
        weights_hash=_state_weights_hash(model),
        config_hash=_config_digest(model.config.to_dict()),
        num_layers=num_layers,
        hidden_size=hidden_size,
    )
