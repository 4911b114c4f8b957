"""Synthetic, harmless pictures for the model organism: coloured shapes on a coloured
background, drawn with Pillow from a seed, each with the caption that describes it."""

from __future__ import annotations

import random

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
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three")
DESCRIBE = (
    "Describe the image.",
    "What is in this picture?",
    "What shapes do you see?",
    "Give a short caption for this image.",
)


def scene(seed: int, size: int = 168) -> tuple[Image.Image, str]:
    """A seeded picture of one to three shapes of one kind and colour, and its caption."""
    rng = random.Random(seed)
    background, colour = rng.sample(sorted(COLOURS), 2)
    shape = rng.choice(SHAPES)
    count = rng.randint(1, 3)
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
