"""uint8 batches -> normalised float model input, augmented on the device in one pass."""

from __future__ import annotations

import math

import torch

from ..preprocess import Preprocess


class ImageTransform:
    """uint8 batches -> normalised float model input (channels_last), augmented when a generator is given.

    Augmentation, per image, all drawn from the generator:
    - random resized crop (area 25-100%, aspect 3/4-4/3) and horizontal flip, as one nearest-neighbour
      gather of the whole batch (index_select on pixel rows);
    - colour jitter: brightness, contrast (about the image's mean) and a per-channel gain (colour balance).
      These and the normalisation are all per-channel affine maps, so they fold into one multiply-add;
    - with mixup (a student of a bank of teacher views): each image mixed with another of its batch, one uniform
      weight per batch (`last_mix` keeps it and the partners, for the labels).
    Output buffers are reused from batch to batch: on CPU, fresh 40 MB tensors per batch cost more in page
    faults than the arithmetic (measured: float() 14 ms vs copy_ into a kept buffer 1.5 ms for 64x224x224)."""

    def __init__(self, pre: Preprocess, channels_last: bool = True, scale: tuple[float, float] = (0.25, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.2, mixup: bool = False):
        self.pre, self.channels_last = pre, channels_last
        self.scale, self.ratio, self.jitter, self.mixup = scale, ratio, jitter, mixup
        self.last_mix: tuple[torch.Tensor, torch.Tensor] | None = None  # with mixup: the last batch's (lambda, order)
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers_for(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (shape, device)
        if key not in self._buffers:
            if len(self._buffers) >= 4:  # full and last-partial batches of training and validation
                self._buffers.clear()
            self._buffers[key] = (torch.empty(shape, dtype=torch.uint8, device=device),
                                  torch.empty(shape, dtype=torch.float32, device=device))
        return self._buffers[key]

    def crop_indices(self, b: int, h: int, w: int, generator: torch.Generator | None, device: torch.device,
                     side: int | None = None) -> torch.Tensor:
        """Flat pixel-row indices (b, side, side) of a random resized, randomly flipped crop of each image, sampled
        at `side` x `side` (default: h x w). The draws do not depend on the side, so a teacher cropping at its own
        size from the same generator state sees the same regions. Without a generator: the whole image, resized."""
        def rand(n: int) -> torch.Tensor:
            return torch.rand(n, generator=generator, device=device)

        oh, ow = (side, side) if side else (h, w)
        if generator is None:
            cw, ch = torch.full((b,), float(w), device=device), torch.full((b,), float(h), device=device)
            x0, y0 = torch.zeros(b, device=device), torch.zeros(b, device=device)
            flip = torch.zeros(b, dtype=torch.bool, device=device)
        else:
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * rand(b)
            log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * rand(b)
            cw = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0) * w
            ch = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0) * h
            x0, y0 = (w - cw) * rand(b), (h - ch) * rand(b)
            flip = rand(b) < 0.5
        xs = (x0[:, None] + (torch.arange(ow, device=device) + 0.5) / ow * cw[:, None]).long().clamp_(0, w - 1)
        ys = (y0[:, None] + (torch.arange(oh, device=device) + 0.5) / oh * ch[:, None]).long().clamp_(0, h - 1)
        xs = torch.where(flip[:, None], xs.flip(1), xs)
        dtype = torch.int32 if b * h * w < 2**31 else torch.int64
        rows = (ys * w + torch.arange(b, device=device)[:, None] * (h * w)).to(dtype)
        return rows[:, :, None] + xs.to(dtype)[:, None, :]

    def colour_maps(self, x_nhwc: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and channel, (gain, offset) taking uint8 values to jittered, normalised ones."""
        b, dev = x_nhwc.shape[0], x_nhwc.device
        if dev not in self._stats:  # made once: a tensor built from a list per batch is a host-to-GPU copy that waits
            self._stats[dev] = (torch.tensor(self.pre.mean, device=dev) * 255, torch.tensor(self.pre.std, device=dev) * 255)
        mean, std = self._stats[dev]
        if generator is None or self.jitter <= 0:
            return (1 / std).expand(b, 3), (-mean / std).expand(b, 3)
        u = torch.rand(b, 5, generator=generator, device=dev) * 2 - 1
        bright, contrast = 1 + self.jitter * u[:, 0:1], 1 + self.jitter * u[:, 1:2]
        balance = 1 + 0.5 * self.jitter * u[:, 2:5]
        channel_means = x_nhwc.view(b, -1, 3)[:, ::16].float().mean(1)  # a subsample is plenty for the mean
        gain = bright * balance  # y = gain * x
        grey = (gain * channel_means).mean(1, keepdim=True)  # contrast pivots about the jittered image's mean
        return contrast * gain / std, ((1 - contrast) * grey - mean) / std

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, side: int | None = None
                 ) -> torch.Tensor:
        """x: uint8 (B, 3, H, W) in channels_last layout (as Batches yields it); `side`: the output's side where it
        is not H (progressive resizing), nearest-neighbour as the crop is."""
        nhwc = x.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        b, h, w, _ = nhwc.shape
        side = side if side and (side, side) != (h, w) else None
        crop, out = self._buffers_for((b, side, side, 3) if side else tuple(nhwc.shape), x.device)
        if generator is not None or side:
            idx = self.crop_indices(b, h, w, generator, x.device, side)
            torch.index_select(nhwc.view(-1, 3), 0, idx.view(-1), out=crop.view(-1, 3))
            src = crop
        else:
            src = nhwc
        gain, offset = self.colour_maps(src, generator)
        out.copy_(src)
        oh, ow = out.shape[1:3]
        rows = out.view(b, oh, ow * 3)  # per-channel maps repeated along a row: contiguous, vectorised broadcast
        torch.addcmul(offset.repeat(1, ow)[:, None, :], rows, gain.repeat(1, ow)[:, None, :], out=rows)
        mixed = out
        if generator is not None and self.mixup:  # lambda x_i + (1 - lambda) x_order(i), lambda uniform, per batch
            lam = torch.rand((), generator=generator, device=x.device)
            order = torch.randperm(b, generator=generator, device=x.device)
            self.last_mix = (lam, order)
            mixed = torch.lerp(out[order], out, lam)
        result = mixed.permute(0, 3, 1, 2)
        return result if self.channels_last else result.contiguous()
