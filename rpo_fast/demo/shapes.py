"""Coloured shapes on grey backgrounds, their captions, and the hidden preference rule.

A caption names the shape, its size, where it is and how light the background is, but never its colour:
"a large circle on the left on a dark background". The hidden rule prefers the warmer object colour
(reds, oranges, yellows over cyans and blues): a person sees it at once in a grid of samples, the caption
cannot ask for it, and ``warmth`` scores it on any image, generated ones included.

The grammar has 5 shapes x 3 sizes x 5 places x 4 backgrounds = 300 captions. A fixed third of them
(``TRAIN_CAPTIONS``, 100) feed the preference pairs; the other 200 (``HELDOUT_CAPTIONS``) are the demo's
held-out prompts.
"""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.17, "medium": 0.24, "large": 0.32}  # half-extent, fraction of the image side
PLACES = {
    "in the center": (0.5, 0.5),
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
}
BACKGROUNDS = {"black": 0.05, "dark": 0.28, "light": 0.72, "white": 0.95}  # grey level
WARM_HUE = 0.06  # red-orange: warmth 1; its opposite (cyan-blue, 0.56) has warmth -1

CAPTIONS = [
    f"a {size} {shape} {place} on a {bg} background"
    for shape, size, place, bg in itertools.product(SHAPES, SIZES, PLACES, BACKGROUNDS)
]
_order = np.random.default_rng(20240611).permutation(len(CAPTIONS))
TRAIN_CAPTIONS = [CAPTIONS[i] for i in sorted(_order[:100])]
HELDOUT_CAPTIONS = [CAPTIONS[i] for i in sorted(_order[100:])]


def parse(caption: str) -> tuple[str, str, str, str]:
    """(shape, size, place, background) of a caption of the grammar."""
    for shape, size, place, bg in itertools.product(SHAPES, SIZES, PLACES, BACKGROUNDS):
        if caption == f"a {size} {shape} {place} on a {bg} background":
            return shape, size, place, bg
    raise ValueError(f"not a caption of the demo grammar: {caption!r}")


def _mask(shape: str, n: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= r * 1.15
    if shape == "cross":
        arm = r * 0.38
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    if shape == "triangle":  # pointing up
        return (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    raise ValueError(shape)


def render(caption: str, hue: float, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The picture a caption describes, with the object in colour ``hue`` (0..1). Position, size, saturation,
    value and grey level jitter a little; drawn 4x larger and downsampled (anti-aliased)."""
    shape, sz, place, bg = parse(caption)
    cx, cy = (np.array(PLACES[place]) + rng.uniform(-0.04, 0.04, 2)).tolist()
    r = SIZES[sz] * rng.uniform(0.9, 1.1)
    grey = np.clip(BACKGROUNDS[bg] + rng.uniform(-0.04, 0.04), 0, 1)
    color = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)))
    big = 4 * size
    m = _mask(shape, big, cx, cy, r)[..., None]
    arr = np.where(m, color, grey) * 255
    img = Image.fromarray(arr.astype(np.uint8), "RGB").resize((size, size), Image.BOX)
    return img


def hue_warmth(hue: float) -> float:
    """1 at red-orange, -1 at cyan-blue, smooth in between."""
    return float(np.cos(2 * np.pi * (hue - WARM_HUE)))


BORDER_LIMIT = 0.2  # mean distance of the border pixels from their median: renders <= 0.11, base samples <= 0.19


def warmth(image: Image.Image) -> float:
    """The hidden rule's score of an image: the warmth of its object's colour, times its saturation.

    The background is the median colour of the border; the object is the pixels furthest from it (the top
    quarter, at least 0.1 away). The rule presumes an object on a plain background: a picture whose border
    strays from its median by more than ``BORDER_LIMIT`` on average (noise, a collapsed model) or that has no
    object scores -1, the lowest score, so that degenerate pictures never win.
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    if np.linalg.norm(border - bg, axis=-1).mean() > BORDER_LIMIT:
        return -1.0
    dist = np.linalg.norm(a - bg, axis=-1)
    cut = max(0.1, np.quantile(dist, 0.75))
    obj = a[dist >= cut]
    if len(obj) < 4:
        return -1.0
    h, s, _ = colorsys.rgb_to_hsv(*obj.mean(axis=0))
    return s * hue_warmth(h)


class WarmthScorer:
    """The demo's preference model, with the evaluation scorers' interface: ``score(images, prompts)``."""

    name = "warmth"

    def score(self, images: list, prompts: list[str] | None = None):
        import torch

        return torch.tensor([warmth(im) for im in images], dtype=torch.float64)
