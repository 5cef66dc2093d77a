"""Where and in what precision work runs: device resolution and autocast, shared by training,
evaluation and the benchmarks."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r}: MPS is not available here; use --device cpu or auto")
    return device


BF16_OVERRIDE = "CNNLAB_CPU_BF16"  # 1 or 0: what precision=auto takes this CPU to have (detection skipped)


def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16, AMX). Elsewhere bf16 autocast is emulated
    and several times slower than fp32 (measured: 6 vs 25 img/s on an AVX2-only EPYC), so auto picks fp32.
    $CNNLAB_CPU_BF16=1 or 0 overrides the detection: a wrong guess fixed by hand, or the test suite run as it
    runs on the other kind of CPU."""
    override = os.environ.get(BF16_OVERRIDE, "").strip()
    if override:
        if override not in ("0", "1"):
            raise ConfigError(f"${BF16_OVERRIDE}={override!r}: expected 1 (treat this CPU as having native bf16) or 0")
        return override == "1"
    try:  # the CPU's own flags (PyTorch's public API tells the vector width, not bf16); no /proc: not Linux, fp32
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or device.type == "mps":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning picks the fastest convolution algorithms for each shape (the first batches pay for the
    search); TF32 for the fp32 matrix products that autocast leaves. `deterministic` trades both for
    bit-identical repeats."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def decode_device(decoder: str, device: torch.device) -> torch.device | None:
    """Where the cache build decodes JPEGs: None for PIL worker processes, a CUDA device for nvJPEG."""
    if decoder == "nvjpeg" and device.type != "cuda":
        raise ConfigError(f"decoder=nvjpeg needs a CUDA device (device is {device}); use --decoder pil or auto")
    if decoder == "nvjpeg" and not _torchvision_decodes_jpeg():
        raise ConfigError("decoder=nvjpeg: this torchvision has no torchvision.io.decode_jpeg; use --decoder pil")
    if decoder == "nvjpeg" or (decoder == "auto" and device.type == "cuda" and _torchvision_decodes_jpeg()):
        return device
    return None


def _torchvision_decodes_jpeg() -> bool:
    """torchvision 0.29 deprecates its decoders in favour of TorchCodec; a later release may drop them."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile with `mode` (off: the model itself). A sweep process compiles one model per trial, each
    a new graph for the same `forward`: dynamo's in-memory cache is cleared first, or after 8 graphs it would
    fall back to eager for the rest of the sweep. Inductor's on-disk graph cache still serves repeated shapes,
    so a second trial of the same architecture compiles in a fraction of the first one's time."""
    if mode == "off":
        return model
    torch.compiler.reset()
    return torch.compile(model, mode=None if mode == "default" else mode)


CPU_FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides fp32 or bf16 speed


def describe_machine(device: torch.device | str | None = None) -> dict[str, object]:
    """The CPU (model, cores, the flags that decide bf16's speed) and the GPU when `device` is one: what a number
    measured on this machine needs beside it to be compared."""
    import platform

    info: dict[str, object] = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu" not in info:
            info["cpu"] = value.strip()
        if key.strip() == "flags":
            flags = set(value.split())
            info["cpu_flags"] = [f for f in CPU_FLAGS_OF_NOTE if f in flags]
            break
    info.setdefault("cpu", platform.processor() or platform.machine())
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
