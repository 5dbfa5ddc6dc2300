"""The demo model's synthetic world: "a {color} {shape} on a {color} background", rendered deterministically; the
object has a random size and sits anywhere in the picture or, as the shipped model was last trained, near its centre.

Every image comes with its ground truth (colors, shape, centre, size), so prompt adherence can be judged exactly
(`bench.demo_eval`). A fixed set of (color, shape, background) combinations never appears in training: those are
what the evaluation asks for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 60, 220), "yellow": (245, 220, 40),
    "orange": (245, 135, 20), "purple": (140, 45, 175), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
IMAGE_SIZE = 128  # the shipped model's resolution; the autoencoder and the first transformer phase train at 64
SUPERSAMPLE = 4  # edges are anti-aliased by rendering at 4x and averaging


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    cx: float  # object centre, pixels
    cy: float
    size: float  # object diameter (circle), side (square), circumscribed diameter (triangle, star)

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, COLORS) if c != b]


def held_out_combinations() -> list[tuple[str, str, str]]:
    """Every 8th combination (28 of 224): each color, shape and background still appears in training, only these
    triples do not."""
    return all_combinations()[3::8]


def training_combinations() -> list[tuple[str, str, str]]:
    held = set(held_out_combinations())
    return [c for c in all_combinations() if c not in held]


def random_scene(rng: np.random.Generator, combinations: list[tuple[str, str, str]],
                 image_size: int = IMAGE_SIZE, centred: bool = False) -> Scene:
    """The same draws give the same scene at every resolution, scaled: sizes 34-63% of the image side, anywhere in
    the picture or (`centred`) within 3% of the side from its centre."""
    color, shape, background = combinations[rng.integers(len(combinations))]
    scale = image_size / 64
    size = float(rng.uniform(22, 40))
    margin = size / 2 + 1
    if centred:
        cx, cy = 32 + rng.uniform(-2, 2, size=2)
    else:
        cx, cy = rng.uniform(margin, 64 - margin, size=2)
    return Scene(color, shape, background, float(cx) * scale, float(cy) * scale, size * scale)


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape, (image_size, image_size) float32."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float64) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords - cx, coords - cy)
    r = size / 2
    if shape == "circle":
        inside = x * x + y * y <= r * r
    elif shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape in ("triangle", "star"):
        inside = _polygon_inside(x, y, _polygon(shape, r))
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    coverage = inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage.astype(np.float32)


def _polygon(shape: str, r: float) -> np.ndarray:
    """Vertices (k, 2), pointing up (image y grows downwards)."""
    if shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, r)
    else:  # a five-pointed star, inner radius 0.45 r
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _polygon_inside(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for every (x, y)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 RGB (image_size, image_size, 3)."""
    coverage = shape_mask(scene.shape, scene.cx, scene.cy, scene.size, image_size)[..., None]
    fg = np.array(COLORS[scene.color], dtype=np.float32)
    bg = np.array(COLORS[scene.background], dtype=np.float32)
    return np.rint(coverage * fg + (1 - coverage) * bg).astype(np.uint8)


def sample_batch(rng: np.random.Generator, batch: int, combinations: list[tuple[str, str, str]],
                 image_size: int = IMAGE_SIZE, centred: bool = False):
    """Scenes and their images as float32 (batch, 3, H, W) in [-1, 1]."""
    scenes = [random_scene(rng, combinations, image_size, centred) for _ in range(batch)]
    images = np.stack([render(s, image_size) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return scenes, images.transpose(0, 3, 1, 2).copy()
