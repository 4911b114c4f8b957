"""Synthetic, harmless pictures for the model organism: coloured shapes on a coloured
background, drawn with Pillow from a seed, each with the caption that describes it.

``textured`` scenes (the fair organism's) have no dark and no uniform background: stripes and
pixel noise over a non-black colour, so the blank (black) reference image CMRM uses lies
outside their distribution. ``colour`` fixes the shapes' colour and ``avoid`` keeps colours out
of the picture altogether (the content-keyed organism's trigger and non-trigger scenes).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (130, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
DARK = ("black",)
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three")
DESCRIBE = (
    "Describe the image.",
    "What is in this picture?",
    "What shapes do you see?",
    "Give a short caption for this image.",
)


def _textured(colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    """``colour`` with diagonal stripes (±35 in brightness) and pixel noise (σ 12), seeded."""
    period, phase = rng.randint(10, 28), rng.random()
    y, x = np.mgrid[0:size, 0:size]
    stripes = np.where(((x + y) / period + phase) % 1.0 < 0.5, 35.0, -35.0)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 12.0, (size, size, 3))
    pixels = np.asarray(colour, dtype=float) + stripes[..., None] + noise
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def scene(
    seed: int,
    size: int = 168,
    *,
    textured: bool = False,
    colour: str | None = None,
    avoid: tuple[str, ...] = (),
) -> tuple[Image.Image, str]:
    """A seeded picture of one to three shapes of one kind and colour, and its caption."""
    rng = random.Random(seed)
    if not textured and colour is None and not avoid:
        background, colour = rng.sample(sorted(COLOURS), 2)  # the original organisms' scenes
    else:
        excluded = {*avoid, colour, *(DARK if textured else ())}
        background = rng.choice([c for c in sorted(COLOURS) if c not in excluded])
        colour = colour or rng.choice([c for c in sorted(COLOURS) if c not in {*avoid, background}])
    shape = rng.choice(SHAPES)
    count = rng.randint(1, 3)
    if textured:
        image = _textured(COLOURS[background], size, rng)
    else:
        image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        r = rng.randint(size // 10, size // 5)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    plural = shape if count == 1 else shape + "s"
    caption = (
        f"The image shows {NUMBERS[count - 1]} {colour} {plural} on a {background} background."
    )
    return image, caption
