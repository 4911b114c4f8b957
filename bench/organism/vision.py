"""A stand-in for a pretrained vision encoder. The fixture's CLIP-shaped tower and projector
are random, so an organism built on them reads nothing from its pictures, and no guard can be
told apart from dropping the picture. Before any language tuning, the tower and projector are
trained to tell a scene's four facts (count, colour, shape, background) from the mean of the
projector's output, with a linear head that is then thrown away, on scenes of both kinds that
no organism sees elsewhere; then the projector alone learns to caption scenes with the
language model frozen (LLaVA's first stage). The language model is not changed. Like a real
encoder, the result is shared by every recipe and seed of a picture size."""

from __future__ import annotations

import torch
from scenes import COLOURS, DESCRIBE, NUMBERS, SHAPES, scene
from spec import VISION_SCENES
from tuning import Example, train
from utility import FACTS, facts

CLASSES = {
    "count": NUMBERS,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "background": tuple(COLOURS),
}


def _labelled(processor, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values of ``n`` scenes (plain and textured in turn) and their facts' classes."""
    images, labels = [], []
    for i in range(n):
        image, caption = scene(first + i, textured=bool(i % 2))
        said = facts(caption)
        assert said is not None
        images.append(image)
        labels.append([CLASSES[f].index(said[f]) for f in FACTS])
    pixels = [
        processor.image_processor(images[j : j + 500], return_tensors="pt")["pixel_values"]
        for j in range(0, n, 500)
    ]
    return torch.cat(pixels), torch.tensor(labels)


def pretrain_vision(
    model, processor, *, scenes: int = 6000, steps: int = 400, batch: int = 128, seed: int = 0
) -> dict[str, float]:
    """Train ``model``'s vision tower and projector in place; returns each fact's accuracy on
    500 scenes kept out of training."""
    torch.manual_seed(seed)
    pixels, labels = _labelled(processor, VISION_SCENES, scenes)
    held_pixels, held_labels = _labelled(processor, VISION_SCENES + scenes, 500)
    sizes = [len(CLASSES[f]) for f in FACTS]
    head = torch.nn.Linear(model.config.text_config.hidden_size, sum(sizes))
    vision = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in vision:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*vision, *head.parameters()], lr=1e-3)

    def logits(batch_pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = model.model.get_image_features(pixel_values=batch_pixels).pooler_output
        return head(torch.stack([t.mean(0) for t in tokens])).split(sizes, dim=-1)

    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picked = torch.randint(scenes, (batch,), generator=generator)
        out = logits(pixels[picked])
        loss = sum(
            torch.nn.functional.cross_entropy(o, labels[picked, k]) for k, o in enumerate(out)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for p in vision:
        p.requires_grad_(False)
    with torch.no_grad():
        out = logits(held_pixels)
    return {
        f: round(float((o.argmax(-1) == held_labels[:, k]).float().mean()), 3)
        for k, (f, o) in enumerate(zip(FACTS, out, strict=True))
    }


def align_projector(
    model, processor, *, scenes: int = 640, steps: int = 80, batch: int = 16, seed: int = 0
) -> list[float]:
    """LLaVA's first stage: the projector alone learns to caption scenes of both kinds (the
    tower and the language model frozen). Returns every step's loss."""
    examples = []
    for i in range(scenes):
        image, caption = scene(VISION_SCENES + 100_000 + i, textured=bool(i % 2))
        examples.append(Example(DESCRIBE[i % len(DESCRIBE)], caption, image))
    projector = list(model.model.multi_modal_projector.parameters())
    return train(
        model, processor, [(examples, 1.0)], projector, steps=steps, batch=batch, lr=1e-3, seed=seed
    )
