"""Decode one image file into a fixed-size RGB uint8 array. Kept free of torch so that the cache
builder's worker processes start fast."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

DECODE_VERSION = 1  # bump when decoding changes, so old caches are not reused


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any mode: greyscale, CMYK, palette; transparency is composited on white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit or float greyscale: scale to 8 bits first
        arr = np.asarray(im, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        im = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8), "L")
    return im.convert("RGB")


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def crop_box(width: int, height: int, crop: float) -> tuple[float, float, float, float] | None:
    """The central square of side crop * the shorter side (None for crop 0: the whole image)."""
    if not crop:
        return None
    side = crop * min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def load_rgb(path: str, size: int, crop: float = 0.0, interpolation: str = "bilinear") -> np.ndarray:
    """(size, size, 3) uint8: with crop 0 the whole image squashed to a square like the reference
    Resize((size, size)); with crop c the central square of side c * the shorter side (see Preprocess).
    JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when that still leaves enough pixels.
    PIL's own limit stands (its global is never changed, so importing cnnlab changes nothing for the caller):
    past twice Image.MAX_IMAGE_PIXELS (179 M pixels by default) the file is refused as a decompression bomb;
    below that the warning is silenced here, since JPEGs decode in draft mode at a fraction of their size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.format == "JPEG":
                need = size if not crop else int(size / crop + 1)
                im.draft("RGB", (need, need))
            im = to_rgb(im)
            box = crop_box(*im.size, crop)
            if im.size != (size, size) or box is not None:
                im = im.resize((size, size), RESAMPLE[interpolation], box=box, reducing_gap=3.0)
            return np.asarray(im, dtype=np.uint8)


def describe_error(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return f"image too large to decode safely ({text})"
    return f"{type(e).__name__}: {text}"


# ---- worker side of the parallel cache build --------------------------------------------------------

def decode_chunk(job: tuple[str, list[int], list[str], int, float, str]) -> list[tuple[int, str | None]]:
    """Decode files into rows of the memory-mapped cache file `npy`; return (row, error or None) for each.
    Each chunk maps the file itself (a few microseconds), so a worker process keeps no state between chunks."""
    npy, rows, paths, size, crop, interpolation = job
    out = np.load(npy, mmap_mode="r+")
    results = []
    for row, path in zip(rows, paths):
        try:
            out[row] = load_rgb(path, size, crop, interpolation)
            results.append((row, None))
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never fatal
            results.append((row, describe_error(e)))
    out.flush()
    return results
