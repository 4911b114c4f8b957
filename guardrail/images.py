"""Reading and validating images; making the corruption image ``img'``."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from guardrail.config import CorruptionSpec
from guardrail.errors import InvalidImageError

ImageInput = Image.Image | bytes | str | Path
# Default pixel budget: 16 MP (4096 x 4096). An image above it is refused from its header,
# before any pixel is decoded; a JPEG is decoded at a reduced scale instead (draft mode).
MAX_PIXELS = 16_000_000
# Working size: 4 MP, above what the supported processors work at (Qwen2-VL at most about 1 MP
# by default, Idefics3 2.1 MP, Llama-3.2-Vision 1.3 MP, LLaVA-NeXT and Gemma 3 less), so a larger
# image is reduced right after decoding, before any copy (the processor would shrink it anyway).
WORKING_PIXELS = 4_000_000
# Longest side over shortest side. Processors scale the shortest side up to their working size,
# so a 1-pixel-high image of a few hundred bytes would otherwise cost gigabytes after the resize
# (a 661-byte 200000x1 PNG took 2 GB and 8 s); no photo, screenshot or document page comes near.
MAX_ASPECT_RATIO = 20.0


def load_image(
    source: ImageInput,
    max_pixels: int = MAX_PIXELS,
    working_pixels: int = WORKING_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> Image.Image:
    """Open and decode an image as RGB, or raise :class:`InvalidImageError`.

    Takes a PIL image, raw bytes or a local path. Truncated files, non-image data, decompression
    bombs, images over ``max_pixels`` and images longer than ``max_aspect_ratio`` times their
    width (what the processor's resize would amplify) are refused with a clear message, from the
    header, before any pixel is decoded (a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that
    is enough). An image over ``working_pixels`` is reduced
    by an integer factor (aspect ratio kept) before it is converted or copied.
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
        if min(width, height) >= 1 and max(width, height) > max_aspect_ratio * min(width, height):
            raise InvalidImageError(
                f"image dimensions {width}x{height} are too elongated "
                f"(at most {max_aspect_ratio:g}:1; the model's resize would enlarge it)"
            )
        if width * height > working_pixels and image.format == "JPEG":
            factor = _reduction(width, height, working_pixels)
            image.draft("RGB", (width // factor, height // factor))  # decodes at 1/2..1/8
            width, height = image.size
        if width < 1 or height < 1 or width * height > max_pixels:
            raise InvalidImageError(
                f"image dimensions {width}x{height} are out of range "
                f"(at most {max_pixels:,} pixels)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        if width * height > working_pixels:
            image = image.reduce(_reduction(width, height, working_pixels))
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


def _reduction(width: int, height: int, pixels: int) -> int:
    """The smallest integer factor that brings ``width x height`` within ``pixels``."""
    return max(1, math.ceil(math.sqrt(width * height / pixels)))


def corruption_image(spec: CorruptionSpec, size: tuple[int, int]) -> Image.Image:
    """The meaningless image of ``spec`` at ``size`` (width, height): black, or seeded noise."""
    width, height = size
    if spec.kind == "blank":
        return Image.new("RGB", (width, height), (0, 0, 0))
    generator = torch.Generator().manual_seed(spec.seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")
