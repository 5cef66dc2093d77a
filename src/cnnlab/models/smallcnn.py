"""The 5-block CNN trained from scratch, and its closed-form parameter and FLOP counts beside it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import ACTIVATIONS, Config
from ..errors import ConfigError

# In place where the backward needs only the output (ReLU, leaky ReLU, ELU): a 64-image batch at 224 px then
# keeps one 400 MB activation less per block for the backward pass.
ACTIVATION_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "elu": lambda: nn.ELU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "selu": nn.SELU,
}
# Non-decreasing activations commute with max-pooling: max(f(a), f(b)) = f(max(a, b)). Pooling first gives the
# same output and gradients, and the activation (forward and backward) touches a quarter of the values.
IMAGE_SIZE = 224  # what image_size=0 (the default) means for the small CNN: the assignment's input
MONOTONE = ("relu", "leaky_relu", "elu", "selu")
assert set(ACTIVATION_LAYERS) == set(ACTIVATIONS), "config.ACTIVATIONS and the layers must name the same set"


class SmallCNN(nn.Module):
    """Five blocks of conv -> [batch norm] -> activation -> 2x2 max-pool, then dense -> activation ->
    dropout -> linear. With a non-decreasing activation (MONOTONE) a block pools before the activation: the
    same function, computed faster. With conv_init="dirac" the first in_channels filters of blocks 2-5 start as
    the identity (airbench's init): the network starts out close to a shallower one. `features[i][0]` is block
    i's convolution; `classifier[-1]` is the output layer."""

    def __init__(self, filters: list[int], kernels: list[int], activation: str, batch_norm: bool,
                 dense_units: int, dropout: float, num_classes: int, image_size: int, in_channels: int = 3,
                 global_pool: bool = False, conv1_stride: int = 1, conv_init: str = "kaiming"):
        super().__init__()
        blocks, c_in, size = [], in_channels, image_size
        for i, (c, k) in enumerate(zip(filters, kernels)):
            stride = conv1_stride if i == 0 else 1
            padding = "same" if stride == 1 else (k - 1) // 2  # torch allows 'same' only at stride 1
            conv = nn.Conv2d(c_in, c, k, stride, padding, bias=not batch_norm)
            if i > 0 and conv_init == "dirac":
                with torch.no_grad():
                    nn.init.dirac_(conv.weight[:c_in])  # after torch's init, so the seeded draws stay the same
            layers: list[nn.Module] = [conv]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            act = ACTIVATION_LAYERS[activation]()
            layers += [nn.MaxPool2d(2), act] if activation in MONOTONE else [act, nn.MaxPool2d(2)]
            blocks.append(nn.Sequential(*layers))
            c_in, size = c, conv_output_size(size, k, stride) // 2
        if size < 1:
            raise ConfigError(f"image_size={image_size} is too small for 5 pooling layers: use at least 32")
        self.features = nn.Sequential(*blocks)
        self.map_size = None if global_pool else size  # the side of the map the dense layer flattens
        if global_pool:
            size = 1
        self.classifier = nn.Sequential(
            *([nn.AdaptiveAvgPool2d(1)] if global_pool else []),
            nn.Flatten(),
            nn.Linear(c_in * size * size, dense_units),
            ACTIVATION_LAYERS[activation](),
            nn.Dropout(dropout),
            nn.Linear(dense_units, num_classes),
        )

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int) -> "SmallCNN":
        cfg = with_own_size(cfg)
        return cls(cfg.filter_counts(), cfg.kernel_sizes(), cfg.activation, cfg.batch_norm,
                   cfg.dense_units, cfg.dropout, num_classes, cfg.image_size, global_pool=cfg.global_pool,
                   conv1_stride=cfg.first_stride(), conv_init=cfg.conv_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.map_size and x.shape[-1] != self.map_size:
            # smaller images than it was built for (progressive resizing's early epochs): the map is pooled or
            # spread to the size the dense layer reads; at the built size this never runs (nor in ONNX)
            x = nn.functional.adaptive_avg_pool2d(x, self.map_size)
        return self.classifier(x)


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Side of a convolution's output: `size` at stride 1 ('same' padding), else with padding (k - 1) // 2."""
    return size if stride == 1 else (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


@torch.no_grad()
def whiten_first_conv(model: SmallCNN, batches: Iterable[torch.Tensor], eps: float = 5e-4) -> int:
    """Initialise the first convolution from the data, as airbench does (patch whitening): its filters become
    the leading eigenvectors of the covariance of the normalised k x k input patches, each scaled by
    1 / sqrt(eigenvalue + eps) and paired with its negative, so the activation keeps both signs of a response.
    The first layer then starts out passing decorrelated, equally scaled patch features instead of random
    projections. Filters beyond 2 * 3k^2 keep their random init. Without batch norm the bias centres the
    responses. `batches`: normalised model input, (B, C, H, W) floats, as the training's transform makes it.
    Returns how many filters were set."""
    conv = model.features[0][0]
    c_out, c_in, k, _ = conv.weight.shape
    dim = c_in * k * k
    products, sums, count = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for x in batches:
        patches = nn.functional.unfold(x.double(), k, stride=k).transpose(1, 2).reshape(-1, dim)  # non-overlapping
        products += patches.T @ patches
        sums += patches.sum(0)
        count += len(patches)
    centre = sums / count
    values, vectors = torch.linalg.eigh(products / count - torch.outer(centre, centre))  # ascending
    pairs = min(c_out // 2, dim)
    top = vectors[:, -pairs:].flip(1).T / torch.sqrt(values[-pairs:].flip(0).clamp(min=0) + eps)[:, None]
    filters = torch.cat([top, -top])
    conv.weight[: 2 * pairs] = filters.reshape(2 * pairs, c_in, k, k).to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias[: 2 * pairs] = -(filters @ centre).to(conv.bias.dtype)
    return 2 * pairs


# ---- parameter and FLOP counts ----------------------------------------------------------------------

@dataclass
class Cost:
    params: int
    flops: int  # forward FLOPs of one image, 2 per multiply-add of the conv and linear layers

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def with_own_size(cfg: Config) -> Config:
    """The config with image_size=0 (the default: the model's own size) read as the small CNN's, IMAGE_SIZE."""
    return cfg if cfg.image_size else replace(cfg, image_size=IMAGE_SIZE)


def smallcnn_cost(cfg: Config, num_classes: int) -> Cost:
    """Closed form. Block i (input size s_i x s_i, c_{i-1} -> c_i channels, kernel k_i, 'same' padding):
        params_i = k_i^2 c_{i-1} c_i + (2 c_i with batch norm, else c_i for the conv bias)
        flops_i  = 2 k_i^2 c_{i-1} c_i o_i^2,  and s_{i+1} = floor(o_i / 2)
    where o_i = s_i is the conv's output side ('same' padding); a first conv of stride t > 1 is padded by
    floor((k_1 - 1) / 2), so o_1 = floor((s_1 + 2 floor((k_1 - 1) / 2) - k_1) / t) + 1.
    Dense (n units) on the s_6 x s_6 x c_5 map (with global_pool, its c_5 channel means: s_6 = 1), then the
    output layer (C classes):
        params = (s_6^2 c_5 + 1) n + (n + 1) C,    flops = 2 s_6^2 c_5 n + 2 n C
    With m filters in every layer, kernel k, image s and no batch norm this is the assignment's
    sum_i (k^2 m^2 + m) + ... ; the FLOPs drop the bias adds, batch norm, activations and pooling, as
    torch.utils.flop_counter does, so the two numbers can be compared exactly."""
    cfg = with_own_size(cfg)
    params = flops = 0
    c_in, s = 3, cfg.image_size
    for i, (c, k) in enumerate(zip(cfg.filter_counts(), cfg.kernel_sizes())):
        o = conv_output_size(s, k, cfg.first_stride() if i == 0 else 1)
        params += k * k * c_in * c + (2 * c if cfg.batch_norm else c)
        flops += 2 * k * k * c_in * c * o * o
        c_in, s = c, o // 2
    n = cfg.dense_units
    if cfg.global_pool:  # the map averaged to c_5 values (the mean's adds are not counted, as for pooling)
        s = 1
    params += (s * s * c_in + 1) * n + (n + 1) * num_classes
    flops += 2 * s * s * c_in * n + 2 * n * num_classes
    return Cost(params, flops)


def measured_cost(model: nn.Module, image_size: int) -> Cost:
    """Parameters by sum(p.numel()) and forward FLOPs of one image by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return Cost(sum(p.numel() for p in model.parameters()), counter.get_total_flops())
