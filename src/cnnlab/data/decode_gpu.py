"""The cache build with nvJPEG: JPEG files decoded in batches on the GPU (`torchvision.io.decode_jpeg` with
`device='cuda'`), resized there with antialiasing, and copied back into the cache's rows a batch at a time.

Files are read by a few threads a batch ahead of the decoder. A file that is not a JPEG (PNG, GIF, ...) or
that nvJPEG refuses (damaged, CMYK, an unusual encoding) goes through the PIL path instead (`decode.load_rgb`)
and, if that fails too, is reported like any unreadable file. The same function runs on CPU (torchvision's
libjpeg-turbo decoder), which is how the tests cover it on a machine without a GPU.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import check_regular_file, crop_box, describe_error, load_rgb, orientation

JPEG_MAGIC = b"\xff\xd8\xff"


def _read(path: Path) -> bytes | BaseException:
    try:
        check_regular_file(path)  # a FIFO would block the reading thread forever
        return path.read_bytes()
    except OSError as e:
        return e


def header_orientation(blob: bytes) -> int | None:
    """The image's EXIF orientation (1-8) read from its header, or None where PIL's decompression-bomb limit
    (2 x Image.MAX_IMAGE_PIXELS) refuses it or the header cannot be read: nvJPEG allocates whatever size a header
    claims, so such a file goes to the PIL path, which refuses it with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as im:
                return orientation(im)
    except Exception:  # noqa: BLE001 - DecompressionBombError or an unreadable header: PIL names it
        return None


def apply_orientation(image: torch.Tensor, value: int) -> torch.Tensor:
    """(3, H, W) turned upright as PIL's ImageOps.exif_transpose does for EXIF orientation `value`. Done here, on
    the device, for every decoder: nvJPEG's batched decode ignores torchvision's apply_exif_orientation."""
    h, w = -2, -1
    if value == 2:
        return image.flip(w)
    if value == 3:
        return image.flip(h, w)
    if value == 4:
        return image.flip(h)
    if value == 5:
        return image.transpose(h, w)
    if value == 6:
        return torch.rot90(image, -1, dims=(h, w))
    if value == 7:
        return image.transpose(h, w).flip(h, w)
    if value == 8:
        return torch.rot90(image, 1, dims=(h, w))
    return image


def _decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 on `device` for each blob, None where it cannot be decoded. The batched call is the
    fast one; it returns nothing when any image fails, so a failed batch is decoded again one by one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of torchcodec
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def resize_square(image: torch.Tensor, size: int, crop: float = 0.0, interpolation: str = "bilinear") -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8 with the PIL path's geometry (the whole image squashed, or its
    central crop), antialiased when shrinking."""
    box = crop_box(image.shape[2], image.shape[1], crop)
    if box is not None:
        left, top, right, bottom = (round(v) for v in box)
        image = image[:, top:bottom, left:right]
    if image.shape[1:] == (size, size):
        return image.permute(1, 2, 0)
    x = F.interpolate(image[None].float(), size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def decode_into(files: list[Path], geometry: tuple[int, float, str], out: np.ndarray, device: torch.device,
                batch: int = 128, on_progress: Callable[[int], Any] = lambda n: None) -> dict[int, str]:
    """Decode `files` into rows of `out` ((N, size, size, 3) uint8) with `geometry` (size, crop, interpolation);
    return {row: why} for unreadable files."""
    size = geometry[0]
    errors: dict[int, str] = {}
    chunks = [list(range(i, min(i + batch, len(files)))) for i in range(0, len(files), batch)]
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.map(_read, [files[r] for r in chunks[0]])] if chunks else []
        for k, rows in enumerate(chunks):
            blobs = list(pending.pop())
            if k + 1 < len(chunks):  # read the next batch while this one decodes
                pending.append(pool.map(_read, [files[r] for r in chunks[k + 1]]))
            turn = {i: header_orientation(b) for i, b in enumerate(blobs) if isinstance(b, bytes) and b[:3] == JPEG_MAGIC}
            jpeg = [i for i, value in turn.items() if value is not None]
            decoded = dict(zip(jpeg, _decode_jpegs([blobs[i] for i in jpeg], device)))
            staged = torch.zeros((len(rows), size, size, 3), dtype=torch.uint8, device=device)
            fallback = []
            for i in range(len(rows)):
                image = decoded.get(i)
                if image is None:
                    fallback.append(i)
                else:
                    staged[i] = resize_square(apply_orientation(image, turn[i]), *geometry)
            out[rows[0]:rows[-1] + 1] = staged.cpu().numpy()
            for i in fallback:  # not a JPEG, or one nvJPEG refused: PIL decides, and names the error
                blob = blobs[i]
                if isinstance(blob, BaseException):
                    errors[rows[i]] = describe_error(blob)
                    continue
                try:
                    out[rows[i]] = load_rgb(str(files[rows[i]]), *geometry)
                except Exception as e:  # noqa: BLE001 - any unreadable file is reported, never fatal (its row stays zero)
                    errors[rows[i]] = describe_error(e)
            on_progress(len(rows))
    return errors
