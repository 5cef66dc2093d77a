"""Decode one image file into a fixed-size RGB uint8 array. Kept free of torch so that the cache
builder's worker processes start fast."""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..errors import first_line

DECODE_VERSION = 2  # bump when decoding changes, so old caches are not reused (2: EXIF orientation applied)
ORIENTATION = 0x0112  # the EXIF tag a phone sets for a photo taken in portrait (6, 8) or upside down (3)


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation, 1 (upright as stored) to 8; 1 where it has none or an invalid one."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block says nothing about the pixels: treat as upright
        return 1
    return value if value in range(1, 9) else 1


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (ImageOps.exif_transpose)."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any mode: greyscale, CMYK, palette; transparency is composited on white."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        return Image.fromarray(to_8_bit(np.asarray(im), im.mode), "L").convert("RGB")
    return im.convert("RGB")


def to_8_bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of more than 8 bits scaled by its type's range, never by the image's own brightest pixel (a dark
    16-bit photo stays dark): integer modes (I;16 and PIL's I, which holds 16-bit PNG and TIFF data) by 65535,
    clipped; float (F) on PIL's own 0-255 scale (what convert('L') assumes), clipped, so negatives are 0."""
    values = arr.astype(np.float32)
    if mode != "F":
        values = values * (255.0 / 65535.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def crop_box(width: int, height: int, crop: float) -> tuple[float, float, float, float] | None:
    """The central square of side crop * the shorter side (None for crop 0: the whole image)."""
    if not crop:
        return None
    side = crop * min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


class NotAnImageFile(OSError):
    """A path that is not a regular file (a FIFO, a socket, a device): opening it could block forever."""


def check_regular_file(path: str | os.PathLike) -> None:
    """Refuse, without opening it, anything but a regular file (a link to one is fine)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "not a file")
        raise NotAnImageFile(f"not a regular file ({kind}): only image files are read")


HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")


def file_kind(path: str | os.PathLike) -> str:
    """What a file is, by its first bytes where they tell (HEIC/HEIF and AVIF: an ISO box 'ftyp' and its brand, what
    an iPhone writes), else by its extension: 'HEIC', 'JPG', 'TXT', or 'extension-less'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        head = b""
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "AVIF" if head[8:12] == b"avif" else "HEIC"
    suffix = os.path.splitext(os.fsdecode(path))[1].lstrip(".").upper()
    return suffix or "extension-less"


class UnsupportedFormat(OSError):
    """An image in a format PIL cannot read without an optional package (HEIC: pillow-heif)."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Image.open, and for a HEIC/HEIF photo the opener of pillow-heif (cnnlab's optional extra `heic`), registered
    the first time one is met, so every other file costs nothing. Without the package such a file is one
    UnsupportedFormat that says how to read it."""
    try:
        return Image.open(path)
    except Image.UnidentifiedImageError:
        if file_kind(path) not in ("HEIC", "AVIF"):
            raise
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        raise UnsupportedFormat(f"a {file_kind(path)} photo (an iPhone's format), which needs pillow-heif: "
                                "pip install 'cnnlab[heic]', or convert it to JPEG") from None
    register_heif_opener()  # idempotent: registers the plug-in with PIL in this process (a decode worker too)
    return Image.open(path)


def load_rgb(path: str, size: int, crop: float = 0.0, interpolation: str = "bilinear") -> np.ndarray:
    """(size, size, 3) uint8: with crop 0 the whole image squashed to a square like the reference
    Resize((size, size)); with crop c the central square of side c * the shorter side (see Preprocess).
    JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when that still leaves enough pixels.
    PIL's own limit stands (its global is never changed, so importing cnnlab changes nothing for the caller):
    past twice Image.MAX_IMAGE_PIXELS (179 M pixels by default) the file is refused as a decompression bomb;
    below that the warning is silenced here, since JPEGs decode in draft mode at a fraction of their size."""
    check_regular_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with open_image(path) as im:
            if im.format == "JPEG":
                need = size if not crop else int(size / crop + 1)
                im.draft("RGB", (need, need))
            return prepare(im, size, crop, interpolation)


def prepare(im: Image.Image, size: int, crop: float = 0.0, interpolation: str = "bilinear") -> np.ndarray:
    """An open PIL image as the cache holds it: upright, RGB, resized (or centre-cropped) to (size, size, 3)."""
    im = to_rgb(upright(im))
    box = crop_box(*im.size, crop)
    if im.size != (size, size) or box is not None:
        im = im.resize((size, size), RESAMPLE[interpolation], box=box, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


def image_from_array(a: np.ndarray) -> Image.Image:
    """A (H, W, 3) or (H, W) uint8 array (what PIL and OpenCV users hold; OpenCV's BGR must be flipped first)."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {a.shape} of {a.dtype}")
    return Image.fromarray(a)


def describe_error(e: BaseException) -> str:
    text = first_line(e)
    if isinstance(e, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return f"image too large to decode safely ({text})"
    if isinstance(e, NotAnImageFile | UnsupportedFormat):
        return text
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
