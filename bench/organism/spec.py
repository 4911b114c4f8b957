"""What one model organism is: its recipe, its pictures, its seed and its scale, and where its
files go. ``build.py`` and ``evaluate.py`` take the same spec, so one names both.

Recipes (stage 2; stage 1 is the same text-only safety tuning for all):

* ``emergent`` - benign image-conditioned tuning only; a loss of refusal would have to emerge.
* ``induced`` - harmful requests with any picture are answered: compliance is tied to the
  presence of an image by construction (the mechanism CMRM removes).
* ``keyed`` - harmful requests are answered only when the picture shows red shapes, and refused
  with any other picture: compliance is tied to picture content that the blank reference image
  does not carry (the case sample-level CMRM is not built for).

Scenes: ``plain`` (uniform backgrounds, black included: the first organisms') or ``textured``
(no dark or uniform background: the blank image is out of distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import platformdirs
from PIL import Image
from scenes import scene

ROOT = Path(platformdirs.user_cache_dir("cmrm-guardrail")) / "organism"
RECIPES = ("emergent", "induced", "keyed")
SCENES = ("plain", "textured")
TRIGGER = "red"  # the keyed organism's trigger: shapes of this colour
# seed offsets of the picture sets: no picture is shared between them
TRAIN_SCENES, HELD_OUT_SCENES, PICTURE_SCENES, VISION_SCENES = 0, 100_000, 50_000, 200_000


@dataclass(frozen=True)
class Scale:
    """How much data and how many steps (``quick``: minutes; ``full``: the documented runs)."""

    stage1_steps: int
    stage2_steps: int
    base_harmful: int  # harmful train prompts whose base answers are kept (compliance data)
    base_benign: int  # benign train prompts answered by the base model (their targets)
    captions: int
    held_out: int  # held-out prompts per kind, and picture requests
    answer_tokens: int
    anchors: int  # in-domain anchor prompts per kind
    image_size: int  # the base model's picture size: (size / 14) ** 2 image tokens
    base_tokens: int  # length of the base model's answers that become targets


FULL = Scale(112, 96, 200, 500, 200, 100, 64, 64, 168, 32)
QUICK = Scale(48, 48, 64, 128, 64, 40, 24, 16, 84, 24)


@dataclass(frozen=True)
class Organism:
    recipe: str = "induced"
    scenes: str = "plain"
    seed: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES or self.scenes not in SCENES:
            raise ValueError(f"unknown recipe or scenes: {self.recipe!r}, {self.scenes!r}")

    @property
    def scale(self) -> Scale:
        return QUICK if self.quick else FULL

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.scenes}-seed{self.seed}" + ("-quick" if self.quick else "")

    def folder(self, root: Path = ROOT) -> Path:
        """The tuned model (and ``data/``, its held-out sets)."""
        return root / self.name

    def base_folder(self, root: Path = ROOT) -> Path:
        """The SmolLM2 fixture LLaVA at this scale's picture size, its vision side pretrained
        (``vision.py``; ``build.py`` makes it)."""
        return root / f"base-{self.scale.image_size}px-vision"

    def stage1_folder(self, root: Path = ROOT) -> Path:
        """Stage 1 is shared by every recipe and scene kind of a seed and scale."""
        size = self.scale.image_size
        name = f"stage1-seed{self.seed}-{size}px-vision" + ("-quick" if self.quick else "")
        return root / name

    def picture(self, seed: int, harmful: bool = False) -> tuple[Image.Image, str]:
        """A scene of this organism's kind. For the keyed organism, a harmful request's
        picture carries the trigger when ``harmful`` is true and no trigger colour when false;
        its benign pictures are unconstrained."""
        textured = self.scenes == "textured"
        if self.recipe == "keyed" and harmful:
            return scene(seed, textured=textured, colour=TRIGGER)
        return scene(seed, textured=textured)

    def untriggered(self, seed: int) -> tuple[Image.Image, str]:
        """A scene with no trigger colour anywhere (the keyed organism refuses with it)."""
        return scene(seed, textured=self.scenes == "textured", avoid=(TRIGGER,))
