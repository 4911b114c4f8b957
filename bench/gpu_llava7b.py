"""GPU benchmark on a LLaVA-1.5-7B-shaped model with random bf16 weights (no download).

CLIP ViT-L/14-336 vision tower (576 image tokens) and a Llama-2-7B-shaped text model, built from
a hand-written config directly on the GPU, then ``bench/overhead.py``'s comparisons (latency
ratios to unguarded and peak memory) at batch 1 and 8, 32 and 128 new tokens, and
``bench/vision_share.py``'s share of a call that a corruption-image feature cache could save.
Under 5 minutes on one H100-class card. ``--scale small`` shrinks every width for a CPU smoke
run of this script.

    python bench/gpu_llava7b.py [--scale full|small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import measure
from vision_share import vision_share

from guardrail import GuardConfig, GuardedVLM
from guardrail.testing import anchor_prompts, fixture_path

SHAPES = {  # (vision hidden, vision layers, text hidden, text intermediate, text layers, heads)
    "full": (1024, 24, 4096, 11008, 32, 32),
    "small": (64, 2, 128, 256, 4, 4),
}


def build(scale: str, device: str) -> GuardedVLM:
    v_hidden, v_layers, hidden, inter, layers, heads = SHAPES[scale]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(fixture_path("tiny"))
    image_size = 336 if scale == "full" else 56
    vision = CLIPVisionConfig(
        hidden_size=v_hidden,
        intermediate_size=4 * v_hidden,
        num_hidden_layers=v_layers,
        projection_dim=768,
        num_attention_heads=max(2, v_hidden // 64),
        image_size=image_size,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32064,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    print(
        f"built {scale} model in {time.perf_counter() - started:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)",
        flush=True,
    )
    return GuardedVLM.from_model(model, processor, GuardConfig())


def main() -> None:
    logging.getLogger("guardrail.decisions").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", default="full", choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", nargs="*", type=int, default=[32, 128])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 8])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vlm = build(args.scale, device)
    vlm.compute_dataset_shift(anchor_prompts()[:8], batch_size=8, progress=False)
    label = f"llava7b-{args.scale}"
    rows = measure(vlm, label, args.tokens, args.batch, args.repeats)
    vision = [vision_share(vlm, label, batch, max(args.tokens), 1) for batch in args.batch]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        json.dumps(
            {
                "benchmark": "gpu_llava7b",
                "device": name,
                "scale": args.scale,
                "rows": rows,
                "vision_share": vision,
            }
        )
    )


if __name__ == "__main__":
    main()
