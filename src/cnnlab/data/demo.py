"""A small, learnable, synthetic 10-class image set in the iNaturalist-12K layout (train/ and val/).

Each class is a shape (its identity); colours, size, position, rotation, background and noise vary
per image, and image sizes vary too, so the set exercises resizing and cannot be solved by colour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "diamond", "star", "crescent")


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular n-gon, or an n-pointed star when `inner` (the inner radius as a fraction of r) is given."""
    k = 2 * n if inner else n
    pts = []
    for i in range(k):
        radius = r * inner if inner and i % 2 else r
        a = rot + 2 * math.pi * i / k
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def draw_shape(shape: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    if sum(abs(a - b) for a, b in zip(bg, fg)) < 150:  # keep the shape visible
        fg = tuple(255 - v for v in bg)
    im = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(im)
    s = min(w, h)
    r = s * rng.uniform(0.22, 0.4)
    cx, cy = w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h
    rot = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    lw = max(2, int(r * 0.3))
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fg)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fg)
    elif shape == "cross":
        for a in (rot, rot + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fg, width=lw)
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=lw)
    elif shape == "stripes":
        step = max(4, int(s * rng.uniform(0.08, 0.14)))
        for x in range(-h, w + h, step * 2):
            d.polygon([(x, 0), (x + step, 0), (x + step + h * 0.5, h), (x + h * 0.5, h)], fill=fg)
    elif shape == "checker":
        step = max(4, int(s * rng.uniform(0.1, 0.18)))
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=fg)
    elif shape == "diamond":
        d.polygon([(cx, cy - r * 1.3), (cx + r * 0.7, cy), (cx, cy + r * 1.3), (cx - r * 0.7, cy)], fill=fg)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r * 1.3, 5, rot, inner=0.4), fill=fg)
    elif shape == "crescent":
        d.ellipse(box, fill=fg)
        off = r * 0.6
        d.ellipse((cx - r + off * math.cos(rot), cy - r + off * math.sin(rot),
                   cx + r + off * math.cos(rot), cy + r + off * math.sin(rot)), fill=bg)
    arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


def make_demo_data(root: str | Path, train_per_class: int = 100, val_per_class: int = 30, seed: int = 0,
                   min_size: int = 96, max_size: int = 192) -> Path:
    """Write ROOT/train/<shape>/*.jpg and ROOT/val/<shape>/*.jpg; returns ROOT."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1)))
                draw_shape(shape, size, rng).save(folder / f"{shape}_{i:04d}.jpg", quality=90)
    return root
