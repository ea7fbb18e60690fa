"""The tiny model's data set: one shape (circle, square, triangle) of one colour moving left, right, up
or down over a plain background, described by a short prompt such as
``"a red circle moving left on a blue background"``, and its word list.

Plain PyTorch: importing it loads no Diffusers (``diffattn generate`` reads :data:`DEFAULT_PROMPTS` here).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["COLORS", "SHAPES", "DIRECTIONS", "VOCAB", "DEFAULT_PROMPTS", "Scene", "scene_prompt", "parse_prompt",
           "random_scenes", "render_videos"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
# (dx, dy) per frame in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

VOCAB: tuple[str, ...] = (
    "<pad>", "<unk>", "a", "an", "the", *COLORS, *SHAPES, *DIRECTIONS,
    "moving", "moves", "going", "on", "over", "in", "front", "of", "background", "and", "with",
)  # fmt: skip
# What `diffattn generate` and `diffattn bench tiny` run on the tiny model: one prompt per direction.
DEFAULT_PROMPTS = (
    "a red circle moving right on a blue background",
    "a yellow square moving down on a purple background",
    "a white triangle moving left on a green background",
    "an orange circle moving up on a black background",
)


@dataclass(frozen=True)
class Scene:
    """One video of the data set.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: shape colour, a key of :data:`COLORS`.
        background: background colour, a key of :data:`COLORS` (different from ``color``).
        direction: a key of :data:`DIRECTIONS`.
        x, y: centre of the shape at frame 0, in pixels.
        radius: half the shape's extent, in pixels.
        speed: pixels travelled per frame.
    """

    shape: str
    color: str
    background: str
    direction: str
    x: float
    y: float
    radius: float
    speed: float


def scene_prompt(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} moving {scene.direction} on a {scene.background} background"


def parse_prompt(prompt: str) -> dict[str, str]:
    """The shape/colour/background/direction words a prompt names (what the model was trained on).

    The first colour word before the shape is the shape's colour; a colour word followed by
    ``background`` is the background. Missing entries are left out.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    found: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in COLORS:
            if i + 1 < len(words) and words[i + 1] == "background":
                found.setdefault("background", w)
            else:
                found.setdefault("color", w)
        elif w in SHAPES:
            found.setdefault("shape", w)
        elif w in DIRECTIONS:
            found.setdefault("direction", w)
    return found


def random_scenes(
    n: int,
    num_frames: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    radius: tuple[float, float] = (0.15, 0.19),
    jitter: float = 1.0,
    directions: Sequence[str] | None = None,
) -> list[Scene]:
    """``n`` random scenes whose whole trajectory over ``num_frames`` stays inside the frame.

    ``radius`` is the range of the shape's half-extent as a fraction of the smaller side. ``jitter``
    is the share of the free room the start position is drawn from, around the placement that centres
    the trajectory in the frame: 1 uses all of it, 0 always centres it (the prompt then fixes where the
    shape is, which a small model learns far faster than choosing a position itself).
    ``directions`` restricts the motion to some keys of :data:`DIRECTIONS` (default: all).
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    directions = list(DIRECTIONS) if directions is None else list(directions)
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ValueError(f"directions must be a non-empty subset of {list(DIRECTIONS)}, got {directions}")
    g = generator

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def choice(seq: Sequence[str]) -> str:
        return seq[int(torch.randint(len(seq), (), generator=g))]

    radius_range = radius
    colors = list(COLORS)
    scenes = []
    for _ in range(n):
        color = choice(colors)
        background = choice([c for c in colors if c != color])
        direction = choice(directions)
        dx, dy = DIRECTIONS[direction]
        radius = uniform(*radius_range) * min(height, width)
        along = width if dx else height
        room = max(along - 2 * radius - 2, 0.0)
        speed = min(uniform(0.045, 0.055) * along, room / max(num_frames - 1, 1))
        travel = speed * (num_frames - 1)
        # start so that the end of the trajectory is inside too
        lo_along, hi_along = radius + 1, along - radius - 1 - travel
        start_along = _around_middle(lo_along, max(hi_along, lo_along), jitter, uniform)
        if dx < 0 or dy < 0:
            start_along = along - start_along
        across = height if dx else width
        start_across = _around_middle(radius + 1, across - radius - 1, jitter, uniform)
        x, y = (start_along, start_across) if dx else (start_across, start_along)
        scenes.append(Scene(choice(list(SHAPES)), color, background, direction, x, y, radius, speed))
    return scenes


def _around_middle(lo: float, hi: float, jitter: float, uniform: Callable[[float, float], float]) -> float:
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * jitter
    return uniform(mid - half, mid + half)


def render_videos(
    scenes: Sequence[Scene], num_frames: int, height: int, width: int, supersample: int = 4
) -> torch.Tensor:
    """Anti-aliased videos of ``scenes``: float32 ``[B, 3, num_frames, height, width]`` in [0, 1]."""
    ss = supersample
    b = len(scenes)
    ys = (torch.arange(height * ss, dtype=torch.float32) + 0.5) / ss
    xs = (torch.arange(width * ss, dtype=torch.float32) + 0.5) / ss
    yy, xx = ys.view(1, 1, -1, 1), xs.view(1, 1, 1, -1)
    f = torch.arange(num_frames, dtype=torch.float32).view(1, -1, 1, 1)

    def per_scene(fn: Callable[[Scene], float]) -> torch.Tensor:
        return torch.tensor([fn(s) for s in scenes], dtype=torch.float32).view(b, 1, 1, 1)

    cx = per_scene(lambda s: s.x) + per_scene(lambda s: DIRECTIONS[s.direction][0] * s.speed) * f
    cy = per_scene(lambda s: s.y) + per_scene(lambda s: DIRECTIONS[s.direction][1] * s.speed) * f
    r = per_scene(lambda s: s.radius)
    ux, uy = xx - cx, yy - cy  # [B, F, H*ss, W*ss]
    circle = ux**2 + uy**2 <= r**2
    # squares and triangles are sized to cover about the area of the circle of the same radius
    side = 0.89 * r
    square = (ux.abs() <= side) & (uy.abs() <= side)
    big = 1.3 * r  # circumradius of an upward equilateral triangle centred on its centroid
    depth = uy + big  # distance below the apex
    triangle = (uy <= big / 2) & (depth >= 0) & (ux.abs() <= depth / math.sqrt(3))
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes]).view(b, 1, 1, 1)
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)).float()
    cover = F.avg_pool2d(mask.view(b * num_frames, 1, height * ss, width * ss), ss)
    cover = cover.view(b, 1, num_frames, height, width)
    fg = torch.tensor([COLORS[s.color] for s in scenes], dtype=torch.float32).view(b, 3, 1, 1, 1) / 255
    bg = torch.tensor([COLORS[s.background] for s in scenes], dtype=torch.float32).view(b, 3, 1, 1, 1) / 255
    return bg + (fg - bg) * cover
