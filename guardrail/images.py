"""Reading and validating images; making the corruption image ``img'``."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from guardrail.config import CorruptionSpec
from guardrail.errors import InvalidImageError

ImageInput = Image.Image | bytes | str | Path
MAX_PIXELS = 64_000_000  # larger images are refused as absurd (a 8000x8000 photo is 64 MP)


def load_image(source: ImageInput) -> Image.Image:
    """Open and fully decode an image as RGB, or raise :class:`InvalidImageError`.

    Takes a PIL image, raw bytes or a local path. Truncated files, non-image data, decompression
    bombs and absurd dimensions are refused with a clear message.
    """
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, bytes | bytearray):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str | Path):
            image = Image.open(Path(source))
        else:
            raise InvalidImageError(f"unsupported image type {type(source).__name__}")
        width, height = image.size
        if width < 1 or height < 1 or width * height > MAX_PIXELS:
            raise InvalidImageError(f"image dimensions {width}x{height} are out of range")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except InvalidImageError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise InvalidImageError(f"not a readable image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"corrupt or truncated image: {e}") from e


def corruption_image(spec: CorruptionSpec, size: tuple[int, int]) -> Image.Image:
    """The meaningless image of ``spec`` at ``size`` (width, height): black, or seeded noise."""
    width, height = size
    if spec.kind == "blank":
        return Image.new("RGB", (width, height), (0, 0, 0))
    generator = torch.Generator().manual_seed(spec.seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")
