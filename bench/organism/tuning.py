"""Fine-tuning pieces of the model organism: chat-formatted examples (with or without an
image), greedy answers, and a seeded training loop with the loss on the answer only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from guardrail.evaluation.judges import RefusalJudge


@dataclass(frozen=True)
class Example:
    """A prompt, the answer to learn, and the picture shown with the prompt (if any)."""

    prompt: str
    answer: str
    image: Image.Image | None = None


def chat_prompt(processor, text: str, with_image: bool = False) -> str:
    content = [{"type": "image"}] if with_image else []
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def answers(model, processor, texts: Sequence[str], tokens: int, batch: int = 32) -> list[str]:
    """Greedy text-only answers (the targets the base model would give itself)."""
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


def refusal_rate(prompts: Sequence[str], said: Sequence[str]) -> float:
    """Share of answers the project's refusal judge calls refusals."""
    judge = RefusalJudge()
    return sum(not judge.judge(p, a).unsafe for p, a in zip(prompts, said, strict=True)) / len(said)


def encode(processor, example: Example) -> dict[str, torch.Tensor]:
    """Token ids of the chat-formatted prompt and answer (and end of turn), where the answer
    starts, and the picture's pixel values if there is one."""
    prompt = chat_prompt(processor, example.prompt, example.image is not None)
    if example.image is None:
        ids = processor.tokenizer(prompt)["input_ids"]
        pixels = None
    else:
        encoded = processor(text=prompt, images=example.image, return_tensors="pt")
        ids, pixels = encoded["input_ids"][0].tolist(), encoded["pixel_values"]
    reply = processor.tokenizer(example.answer.strip() + "<|im_end|>", add_special_tokens=False)
    row = {"ids": torch.tensor(ids + reply["input_ids"]), "start": torch.tensor(len(ids))}
    return row if pixels is None else row | {"pixels": pixels}


def collate(rows: Sequence[dict[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, a mask, labels on the answers only, and the images of image rows."""
    width = max(len(r["ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        ids, start = row["ids"], int(row["start"])
        input_ids[j, : len(ids)] = ids
        labels[j, start : len(ids)] = ids[start:]
        mask[j, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    pixels = [r["pixels"] for r in rows if "pixels" in r]
    return batch | ({"pixel_values": torch.cat(pixels)} if pixels else {})


def train(
    model,
    processor,
    groups: Sequence[tuple[Sequence[Example], float]],
    parameters: Sequence[torch.nn.Parameter],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log_every: int = 16,
) -> list[float]:
    """AdamW on ``parameters`` only (everything else frozen), warm-up then linear decay.
    Each batch row picks a group with probability proportional to its weight, then an
    example of it uniformly. Returns the loss of every step."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    )
    encoded = [[encode(processor, e) for e in examples] for examples, _ in groups]
    weights = torch.tensor([w for _, w in groups], dtype=torch.float)
    generator = torch.Generator().manual_seed(seed)
    pad = processor.tokenizer.pad_token_id
    losses = []
    model.train()
    for step in range(steps):
        picked = torch.multinomial(weights, batch, replacement=True, generator=generator)
        rows = []
        for g in picked.tolist():
            i = int(torch.randint(len(encoded[g]), (1,), generator=generator))
            rows.append(encoded[g][i])
        loss = model(**collate(rows, pad)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step:4d} loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses
