"""Stage 1 of the model organism: safety-tune SmolLM2 inside the LLaVA fixture, text only.

Harmful training prompts get a short refusal; benign ones get the base model's own greedy
answer. The decoder layers and final norm are tuned (embeddings, head, vision tower and
projector frozen), with the loss on the answer tokens only. Refusal on the held-out prompts
(templates and topics never seen in training) is measured before and after. The result is
saved in the user cache folder (never in the repository). Seeded; prints a JSON line.

    python bench/organism/stage1.py [--steps 112] [--batch 8] [--lr 1e-4] [--benign-weight 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import platformdirs
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).parent))
from prompts import REFUSAL, prompts, refused

from guardrail.testing import fixture_path

OUT = Path(platformdirs.user_cache_dir("cmrm-guardrail")) / "organism" / "stage1"


def chat_prompt(processor, text: str) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def answers(model, processor, texts: list[str], tokens: int, batch: int = 16) -> list[str]:
    """Greedy text-only answers."""
    out: list[str] = []
    tokenizer = processor.tokenizer
    for start in range(0, len(texts), batch):
        chunk = [chat_prompt(processor, t) for t in texts[start : start + batch]]
        inputs = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        generated = model.generate(
            **inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = generated[:, inputs["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def refusal_rates(model, processor) -> dict[str, float]:
    rates = {}
    for kind in ("harmful", "benign"):
        said = answers(model, processor, prompts(kind, "held_out"), tokens=12)
        rates[kind] = sum(refused(a) for a in said) / len(said)
    return rates


def examples(processor, pairs: list[tuple[str, str]]) -> list[tuple[torch.Tensor, int]]:
    """Token ids of prompt plus answer (and end of turn), and where the answer starts."""
    tokenizer = processor.tokenizer
    encoded = []
    for text, answer in pairs:
        prompt = tokenizer(chat_prompt(processor, text))["input_ids"]
        reply = tokenizer(answer.strip() + "<|im_end|>", add_special_tokens=False)["input_ids"]
        encoded.append((torch.tensor(prompt + reply), len(prompt)))
    return encoded


def train(
    model, processor, pairs, weights: list[float], steps: int, batch: int, lr: float, seed: int
) -> float:
    language = model.model.language_model
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = [p for p in [*language.layers.parameters(), *language.norm.parameters()]]
    for p in tuned:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(tuned, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )
    data = examples(processor, pairs)
    generator = torch.Generator().manual_seed(seed)
    pad = processor.tokenizer.pad_token_id
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        picked = torch.multinomial(
            torch.tensor(weights), batch, replacement=True, generator=generator
        ).tolist()
        rows = [data[i] for i in picked]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for j, (ids, answer_start) in enumerate(rows):
            input_ids[j, : len(ids)] = ids
            labels[j, answer_start : len(ids)] = ids[answer_start:]
            mask[j, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss_value = float(loss)
        if step % 16 == 0:
            print(f"step {step:4d} loss {loss_value:.3f}", flush=True)
    model.eval()
    return loss_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--benign-weight", type=float, default=1.0, help="sampling weight of benign examples"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.perf_counter()
    source = fixture_path("smollm")
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    before = refusal_rates(model, processor)
    print(f"before: {before}", flush=True)
    benign = prompts("benign", "train")
    benign_answers = answers(model, processor, benign, tokens=40)
    harmful = [(p, REFUSAL) for p in prompts("harmful", "train")]
    pairs = harmful + list(zip(benign, benign_answers, strict=True))
    weights = [1.0] * len(harmful) + [args.benign_weight] * len(benign)
    loss = train(model, processor, pairs, weights, args.steps, args.batch, args.lr, args.seed)
    after = refusal_rates(model, processor)
    print(f"after: {after}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    processor.save_pretrained(OUT)
    result = {
        "bench": "organism-stage1",
        "held_out_refusal_before": before,
        "held_out_refusal_after": after,
        "final_loss": round(loss, 4),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "benign_weight": args.benign_weight,
        "build_s": round(time.perf_counter() - started, 1),
        "saved": str(OUT),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
