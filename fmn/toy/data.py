"""A procedural shapes-and-colours data set, deterministic from a seed and generated on the fly.

Every image is 32 x 32 RGB: one filled shape (circle, square, triangle, star, heart) in one
colour (red, green, blue, yellow, purple) on a white background, at a random size and position,
anti-aliased by 4 x 4 supersampling. Captions come from several templates ("a red circle",
"a photo of a red circle", "a circle in red", ...), with a few naming only the shape or only
the colour, so that prompts such as "a photo of a circle" mean something to the model too.

Item `i` of `ShapesDataset(seed)` depends only on `(seed, i)`: any subset can be drawn in any
order, by any number of workers, and is always the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLORS = ("red", "green", "blue", "yellow", "purple")
RGB = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 200, 15),
    "purple": (145, 45, 185),
}
BACKGROUND = (255, 255, 255)
SIZE = 32
SUPERSAMPLE = 4
# Half extent of a shape in pixels (its "radius"), drawn uniformly from this range.
RADIUS_RANGE = (6.5, 13.0)

# Caption templates: {c} colour, {s} shape, {a} the article for the word that follows it.
FULL_TEMPLATES = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "a drawing of a {c} {s}",
    "a {s} in {c}",
    "a {c} colored {s}",
    "{c} {s}",
)
SHAPE_TEMPLATES = ("a {s}", "a photo of a {s}", "a picture of a {s}", "{s}")
COLOR_TEMPLATES = ("a {c} shape", "a photo of something {c}", "{c}")


def all_captions() -> list[str]:
    """Every caption `caption_for` can produce, sorted."""
    caps = {t.format(c=c, s=s) for t in FULL_TEMPLATES + SHAPE_TEMPLATES + COLOR_TEMPLATES
            for s in SHAPES for c in COLORS}
    return sorted(caps)


def vocabulary() -> list[str]:
    """Every word a caption can contain (the toy tokenizer's vocabulary is built from them)."""
    return sorted({w for cap in all_captions() for w in cap.split()})


def _polygon_mask(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for arrays of points (x, y) and vertices (vx, vy)."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x1, y1, x2, y2 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        xi = x1 + (y - y1) * (x2 - x1) / (y2 - y1 + 1e-12)
        inside ^= crosses & (x < xi)
    return inside


def _star_vertices(inner: float = 0.42):
    ang = np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return rad * np.cos(ang), rad * np.sin(ang)


_TRI = (np.cos(np.pi / 2 + np.arange(3) * 2 * np.pi / 3), np.sin(np.pi / 2 + np.arange(3) * 2 * np.pi / 3))
_STAR = _star_vertices()


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in local coordinates: u right, v up, the shape's radius is 1."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":
        # circumradius 1.12, centroid shifted down so that the triangle fills [-1, 1] vertically
        return _polygon_mask(u, v + 0.2, _TRI[0] * 1.2, _TRI[1] * 1.2)
    if shape == "star":
        return _polygon_mask(u, v + 0.05, _STAR[0] * 1.08, _STAR[1] * 1.08)
    if shape == "heart":
        x, y = u * 1.25, v * 1.25 - 0.12
        return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(shape: str, color: str | tuple[int, int, int], cx: float, cy: float, radius: float,
           size: int = SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """One image as uint8 array (size, size, 3). (cx, cy) is the centre in pixels, y down."""
    rgb = np.asarray(RGB[color] if isinstance(color, str) else color, dtype=np.float32)
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    px, py = np.meshgrid(coords, coords)
    inside = shape_mask(shape, (px - cx) / radius, (cy - py) / radius)
    alpha = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    img = np.asarray(BACKGROUND, dtype=np.float32) * (1.0 - alpha) + rgb * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 (32, 32, 3)
    shape: int  # index into SHAPES
    color: int  # index into COLORS
    caption: str
    cx: float
    cy: float
    radius: float


def caption_for(shape: str, color: str, rng: np.random.Generator, partial_prob: float = 0.2) -> str:
    """A random caption for (shape, color); with `partial_prob` it names only one of the two."""
    r = rng.random()
    if r < partial_prob / 2:
        t = SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))]
    elif r < partial_prob:
        t = COLOR_TEMPLATES[rng.integers(len(COLOR_TEMPLATES))]
    else:
        t = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
    return t.format(c=color, s=shape)


def make_sample(seed: int, index: int, shape: int | None = None, color: int | None = None,
                partial_prob: float = 0.2) -> Sample:
    """Item `index` of the data set with `seed`; shape/colour may be forced (indices)."""
    rng = np.random.default_rng([int(seed), int(index)])
    s = int(rng.integers(len(SHAPES))) if shape is None else int(shape)
    c = int(rng.integers(len(COLORS))) if color is None else int(color)
    radius = float(rng.uniform(*RADIUS_RANGE))
    margin = radius + 1.0
    cx = float(rng.uniform(margin, SIZE - margin))
    cy = float(rng.uniform(margin, SIZE - margin))
    img = render(SHAPES[s], COLORS[c], cx, cy, radius)
    cap = caption_for(SHAPES[s], COLORS[c], rng, partial_prob)
    return Sample(img, s, c, cap, cx, cy, radius)


class ShapesDataset(torch.utils.data.Dataset):
    """`length` items of the procedural data set; item i -> dict(pixel_values in [-1, 1], shape, color, caption).

    Balanced option: shape = i % 5, colour = (i // 5) % 5, so every block of 25 covers all pairs.
    """

    def __init__(self, seed: int = 0, length: int = 10000, balanced: bool = False, partial_prob: float = 0.2):
        self.seed, self.length, self.balanced, self.partial_prob = seed, length, balanced, partial_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if i < 0 or i >= self.length:
            raise IndexError(i)
        s = c = None
        if self.balanced:
            s, c = i % len(SHAPES), (i // len(SHAPES)) % len(COLORS)
        smp = make_sample(self.seed, i, s, c, self.partial_prob)
        return {"pixel_values": to_tensor(smp.image), "shape": smp.shape, "color": smp.color,
                "caption": smp.caption}


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1.0)


def batch(seed: int, n: int, start: int = 0, balanced: bool = True, partial_prob: float = 0.2):
    """n items as tensors: (pixels (n,3,32,32) in [-1,1], shapes (n,), colors (n,), captions list)."""
    ds = ShapesDataset(seed, start + n, balanced, partial_prob)
    items = [ds[i] for i in range(start, start + n)]
    return (torch.stack([it["pixel_values"] for it in items]),
            torch.tensor([it["shape"] for it in items]), torch.tensor([it["color"] for it in items]),
            [it["caption"] for it in items])
