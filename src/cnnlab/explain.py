"""What a trained model looks at: first-layer filters, guided back-propagation of last-conv neurons, Grad-CAM.

Guided back-propagation (Springenberg et al. 2015) changes only the backward pass of the activations:
the gradient flows back through a unit only where its forward input was positive AND the gradient
arriving from above is positive. For ReLU that is the textbook rule. The other activations cnnlab offers
(GELU, SiLU, Mish, ELU, leaky ReLU, SELU) get the same gate, `grad_in = max(grad_out, 0) * [x > 0]`:
their own derivative is dropped, which is exactly what guided backprop does for ReLU (whose derivative is
the gate). captum's GuidedBackprop overrides only nn.ReLU modules, so it would silently give plain
gradients for the other activations; hence this small custom autograd function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .data import CachedImages, ImageTransform
from .io import atomic_write_json
from .models.smallcnn import ACTIVATION_LAYERS
from .run_folder import EXPLAIN_RECORD

ACTIVATION_TYPES = tuple({type(factory()) for factory in ACTIVATION_LAYERS.values()})


class _GuidedGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        ctx.save_for_backward(x)
        return act(x.clone() if getattr(act, "inplace", False) else x)  # torchvision's in-place ReLUs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype), None


class GuidedActivation(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedGate.apply(x, self.act)


class guided:
    """Context manager: inside it, every activation module of `model` back-propagates the guided way."""

    def __init__(self, model: nn.Module):
        self.model, self.swapped = model, []

    def __enter__(self) -> nn.Module:
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ACTIVATION_TYPES):
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, attr, GuidedActivation(module))
                self.swapped.append((parent, attr, module))
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for parent, attr, module in self.swapped:
            setattr(parent, attr, module)


def last_conv(model: nn.Module) -> nn.Conv2d:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _capture(layer: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    store: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        store["out"] = out

    return store, layer.register_forward_hook(hook)


def guided_backprop(model: nn.Module, x: torch.Tensor, layer: nn.Module, channel: int) -> torch.Tensor:
    """d(max over space of `layer`'s output channel `channel`) / d(input), guided; fp32, one map per image."""
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    store, handle = _capture(layer)
    try:
        with guided(model), torch.enable_grad():
            model(x)
            target = store["out"][:, channel].flatten(1).max(1).values.sum()
            (grad,) = torch.autograd.grad(target, x)
    finally:
        handle.remove()
    return grad


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module, classes: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps (B, H, W) in [0, 1] at the input's size for `classes` (default: the predicted ones)."""
    model.eval()
    store, handle = _capture(layer)
    try:
        with torch.enable_grad():
            logits = model(x)
            classes = logits.argmax(1) if classes is None else classes
            acts = store["out"]
            (grads,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), acts)
    finally:
        handle.remove()
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    return cam.detach(), classes


def explain(model: nn.Module, images: CachedImages, rows: np.ndarray, transform: ImageTransform, classes: list[str],
            out_dir: str | Path, neurons: int = 10, per_neuron: int = 3, sample: int = 256, seed: int = 0,
            log: Callable[[str], None] = print, device: torch.device | None = None) -> dict[str, Path]:
    """Write filters.png, guided_backprop.png and gradcam.png into out_dir, computed in fp32 (gradients of single
    images: autocast's rounding would show in the maps) on `device` (default: the model's), and explain.json saying
    on what, with which neurons and how many images."""
    from .visualise import plot_filters, plot_gradcam, plot_guided

    out_dir = Path(out_dir)
    device = device if device is not None else next(model.parameters()).device
    model = model.float().to(device).eval()
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, size=min(sample, len(rows)), replace=False))
    pixels = np.ascontiguousarray(images.pixels[chosen])
    x_all = transform(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)).clone()
    paths = {"filters": plot_filters(first_conv(model).weight.detach().float().cpu().numpy(), out_dir / "filters.png")}

    layer = last_conv(model)
    store, handle = _capture(layer)
    peaks = []
    with torch.inference_mode():
        for i in range(0, len(x_all), 64):
            model(x_all[i:i + 64])
            peaks.append(store["out"].float().flatten(2).max(2).values)
    handle.remove()
    peaks = torch.cat(peaks).cpu()  # (images, channels)
    picked = torch.linspace(0, peaks.shape[1] - 1, min(neurons, peaks.shape[1])).round().long().tolist() \
        if peaks.shape[1] > neurons else list(range(peaks.shape[1]))
    if neurons > peaks.shape[1]:
        log(f"--neurons {neurons}: the last conv layer has {peaks.shape[1]} channels, so all {peaks.shape[1]} are shown")
    row_images, row_maps, row_scores = [], [], []
    for c in picked:
        top = peaks[:, c].topk(min(per_neuron, len(x_all))).indices
        g = guided_backprop(model, x_all[top], layer, c)
        row_images.append([pixels[int(i)] for i in top])
        row_maps.append([m.permute(1, 2, 0).cpu().numpy() for m in g])
        row_scores.append([float(peaks[int(i), c]) for i in top])
    paths["guided_backprop"] = plot_guided(picked, row_images, row_maps, row_scores, out_dir / "guided_backprop.png")

    grid = torch.from_numpy(rng.choice(len(x_all), size=min(12, len(x_all)), replace=False))
    cams, predicted = grad_cam(model, x_all[grid.to(device)], layer)
    cams, predicted = cams.cpu(), predicted.cpu()
    titles = [f"pred: {classes[int(p)]}\ntrue: {classes[int(images.labels[chosen[int(i)]])]}"
              for p, i in zip(predicted, grid)]
    paths["gradcam"] = plot_gradcam([pixels[int(i)] for i in grid], list(cams.numpy()), titles, out_dir / "gradcam.png")
    log(f"explained neurons {picked} of {layer} using {len(x_all)} test images on {device}")
    atomic_write_json(out_dir / EXPLAIN_RECORD, {"device": str(device), "precision": "fp32", "neurons": picked,
                                                 "images": len(x_all), "seed": seed,
                                                 "figures": {k: p.name for k, p in paths.items()}})
    return paths
