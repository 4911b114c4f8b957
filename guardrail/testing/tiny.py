"""Tiny random vision-language models, one per known family, built from transformers configs.

Each has a BPE tokenizer trained in code (with the family's special tokens), a ChatML-like chat
template that places the family's image placeholder, the family's processor (slow PIL image
processor) and a 4-layer, hidden-64 text model. They are saved and reloaded through
``from_pretrained``, the code path users take. Random weights: they test plumbing and exact
invariants, nothing about safety.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_CORPUS_WORDS = (
    "the a an is are was what how why where who picture image photo shows show describe tell me "
    "about this that there here cat dog person man woman child car street house tree sky water "
    "red blue green white black small large happy sad run walk sit stand hold look see make "
    "do can could would should will please explain answer question help safe unsafe sorry cannot "
    "assist with request i you we they it of in on at to for from by and or not no yes"
).split()
_BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML, like SmolLM2's own template (so text-only prompts render byte for byte the same), but it
# also takes a list of parts, rendering each image part as the family's image placeholder.
CHAT_TEMPLATE = (
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


def train_tokenizer(specials: list[str], named: dict[str, str], placeholder: str) -> Any:
    """A small byte-level BPE tokenizer with ``specials`` (beyond the ChatML ones); ``named``
    are extra special-token attributes (``image_token`` ...); ``placeholder`` is what the
    chat template writes for an image part."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(len(_CORPUS_WORDS), (400, 12), generator=generator)
    lines = [" ".join(_CORPUS_WORDS[i] for i in row) for row in idx.tolist()]
    trainer = trainers.BpeTrainer(
        vocab_size=399 + len(specials),
        special_tokens=_BASE_SPECIALS + specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*lines, *_CORPUS_WORDS], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        extra_special_tokens=named,
        chat_template=CHAT_TEMPLATE.replace("@IMAGE@", placeholder),
    )


def _text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
Parts = tuple[Any, Any, Any, dict[str, Any]]  # config, processor, tokenizer, processor options


def _llava(next_: bool) -> Parts:
    import transformers as tf
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = train_tokenizer(["<image>"], {"image_token": "<image>"}, "<image>")
    image_id = tok.convert_tokens_to_ids("<image>")
    text, vision = tf.LlamaConfig(**_text(tok)), tf.CLIPVisionConfig(**_VISION)
    sizes: dict[str, Any] = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    options: dict[str, Any] = dict(
        patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )
    if not next_:
        processor: Any = tf.LlavaProcessor(
            LlavaImageProcessorPil(**sizes), tok, chat_template=tok.chat_template, **options
        )
        config: Any = tf.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_id,
            vision_feature_select_strategy="default",
        )
        return config, processor, tok, {}
    processor = tf.LlavaNextProcessor(
        LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=_PINPOINTS),
        tok,
        chat_template=tok.chat_template,
        **options,
    )
    config = tf.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return config, processor, tok, {}


def _llava_onevision() -> Parts:
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from guardrail.backends.processors import without_video

    tok = train_tokenizer(
        ["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"}, "<image>"
    )
    options: dict[str, Any] = dict(
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
    )
    processor = without_video(tf.LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=None,
        chat_template=tok.chat_template,
        **options,
    )
    config = tf.LlavaOnevisionConfig(
        text_config=tf.Qwen2Config(**_text(tok)),
        vision_config=tf.SiglipVisionConfig(**_VISION),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return config, processor, tok, options


def _qwen(version: str) -> Parts:
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from guardrail.backends.processors import without_video

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = train_tokenizer(
        specials,
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        "<|vision_start|><|image_pad|><|vision_end|>",
    )
    ids = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in zip(
            ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
            specials,
            strict=True,
        )
    }
    # The processor's default pixel range, as real checkpoints ship it (size holds pixel counts).
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    text = _text(tok, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    common: dict[str, Any] = dict(
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, depth=2, num_heads=2
    )
    cls: Any
    config_cls: Any
    vision: dict[str, Any]
    if version == "2":
        cls, config_cls = tf.Qwen2VLProcessor, tf.Qwen2VLConfig
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
    else:
        cls, config_cls = tf.Qwen2_5_VLProcessor, tf.Qwen2_5_VLConfig
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=56,
            **common,
        )
    processor = without_video(cls)(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=None,
        chat_template=tok.chat_template,
    )
    return config_cls(text_config=text, vision_config=vision, **ids), processor, tok, {}


def _gemma3() -> Parts:
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = train_tokenizer(
        ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        {
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        "<start_of_image>",
    )
    processor = tf.Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tok,
        chat_template=tok.chat_template,
        image_seq_length=4,
    )
    config = tf.Gemma3Config(
        text_config=_text(tok, head_dim=16, sliding_window=64),
        vision_config=dict(_VISION),
        mm_tokens_per_image=4,
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
    )
    return config, processor, tok, {}


def _idefics3() -> Parts:
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tok = train_tokenizer(specials + grid, {"image_token": "<image>"}, "<image>")
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    processor = tf.Idefics3Processor(
        image_processor, tok, image_seq_len=4, chat_template=tok.chat_template
    )
    config = tf.Idefics3Config(
        text_config=_text(tok),
        vision_config=dict(_VISION),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return config, processor, tok, {}


def _mllama() -> Parts:
    import transformers as tf
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = train_tokenizer(
        ["<|image|>", "<|python_tag|>"], {"image_token": "<|image|>"}, "<|image|>"
    )
    processor = tf.MllamaProcessor(
        MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1),
        tok,
        chat_template=tok.chat_template,
    )
    text = _text(tok, cross_attention_layers=[1, 3])
    vision: dict[str, Any] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        image_size=32,
        patch_size=8,
        max_num_tiles=1,
        vision_output_dim=64,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    config = tf.MllamaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    return config, processor, tok, {}


_PARTS: dict[str, Callable[[], Parts]] = {
    "llava": lambda: _llava(next_=False),
    "llava_next": lambda: _llava(next_=True),
    "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda: _qwen("2"),
    "qwen2_5_vl": lambda: _qwen("2.5"),
    "gemma3": _gemma3,
    "idefics3": _idefics3,
    "mllama": _mllama,
}
TINY_FAMILIES = tuple(_PARTS)


def build_tiny_vlm(family: str, path: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random model of ``family`` (a name in :data:`TINY_FAMILIES`)."""
    from transformers import AutoModelForImageTextToText

    if family not in _PARTS:
        raise ValueError(f"no tiny builder for family {family!r}; known: {TINY_FAMILIES}")
    config, processor, tokenizer, options = _PARTS[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():  # Mllama's cross-attention gates start at 0 (tanh 0 = no image)
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_checkpoint(Path(path), model, processor, options)


def save_checkpoint(
    path: Path,
    model: Any,
    processor: Any,
    options: dict[str, Any],
    rename: Callable[[str], str] | None = None,
) -> Path:
    """Save ``model`` and ``processor`` at ``path`` atomically (a folder renamed into place);
    ``rename`` rewrites the saved tensor names (to the layout other runtimes expect).

    A processor without a video processor (torchvision missing) cannot save itself: its
    tokenizer, image processor and ``options`` are saved instead, which ``from_pretrained``
    reads back the same way (and, with torchvision, as the full processor).
    """
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if rename is not None:
        from safetensors.torch import load_file, save_file

        for file in tmp.glob("*.safetensors"):
            tensors = {rename(name): t for name, t in load_file(file).items()}
            save_file(tensors, file, metadata={"format": "pt"})
    if getattr(processor, "video_processor", True) is None:
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        config = {"processor_class": type(processor).__name__, **options}
        (tmp / "processor_config.json").write_text(json.dumps(config, indent=2))
    else:
        processor.save_pretrained(tmp)
    tmp.rename(path)
    return path
