"""Where and in what precision work runs: device resolution and autocast, shared by training,
evaluation and the benchmarks."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

SUPPORTED_DEVICES = ("cpu", "cuda", "mps")  # the device types cnnlab trains and predicts on


def resolve_device(name: str) -> torch.device:
    """The torch device `name` (auto, cpu, cuda, cuda:N, mps) names, refused in one line where it is none of those or
    is absent here: before any work, by every command (train, lr-find, evaluate, predict, export, explain, env)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in SUPPORTED_DEVICES:  # xpu, meta, ...: PyTorch names them, cnnlab runs none
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
    return flags_have_bf16(flags)


def flags_have_bf16(flags: set[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags computes bf16 natively: AVX512-BF16 or AMX's bf16 tiles."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class DeviceFacts:
    """What cnnlab's device-dependent decisions (precision, decoder, keeping data on the GPU) read about a device;
    each decision is a pure function of these, so the rules for a T4 or an H100 are tested on a machine without one."""

    type: str  # cpu | cuda | mps
    name: str = ""
    capability: tuple[int, int] | None = None  # CUDA compute capability (7, 5) for a T4
    memory_bytes: int | None = None  # the GPU's total memory
    cpu_bf16: bool = False  # the CPU computes bf16 natively (AVX512-BF16 or AMX)

    def describe(self) -> str:
        if self.type == "cuda":
            memory = f", {self.memory_bytes / 2**30:.0f} GiB" if self.memory_bytes else ""
            return f"{self.name or 'CUDA GPU'} (compute capability {'.'.join(map(str, self.capability or ()))}{memory})"
        if self.type == "cpu":
            return f"CPU ({'native bf16' if self.cpu_bf16 else 'no native bf16'})"
        return self.type.upper()


def device_facts(device: torch.device) -> DeviceFacts:
    """The facts of a resolved device, read from PyTorch (CUDA) or the CPU's flags."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceFacts("cuda", props.name, (props.major, props.minor), props.total_memory)
    if device.type == "cpu":
        return DeviceFacts("cpu", cpu_bf16=cpu_has_bf16())
    return DeviceFacts(device.type)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TENSOR_CORES = (7, 0)  # Volta: the first GPUs whose tensor cores multiply fp16
BF16_ARITHMETIC = (8, 0)  # Ampere: the first with bf16 arithmetic (and tensor cores for it)


@dataclass(frozen=True)
class Precision:
    """How training and inference compute: autocast's dtype (fp32: no autocast) and whether a gradient scaler keeps
    fp16's small gradients from underflowing (bf16 has fp32's range and needs none)."""

    name: str  # fp32 | bf16 | fp16
    scaler: bool
    why: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def describe(self) -> str:
        how = "fp32" if self.name == "fp32" else f"{self.name} autocast" + (" with a gradient scaler" if self.scaler else "")
        return f"{how} ({self.why})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scaler": self.scaler, "why": self.why}


def precision_policy(precision: str, facts: DeviceFacts, strict: bool = True) -> Precision:
    """The precision `precision` (auto, fp32, bf16, fp16) means on a device with `facts`. auto: on CUDA bf16 from
    compute capability 8.0 (Ampere: A100, L4, H100), fp16 with a gradient scaler from 7.0 (V100, T4: their tensor cores
    are fp16's), fp32 below (P100: no tensor cores); on the CPU bf16 where it is native, else fp32 (emulated bf16 is
    slower); on MPS fp32. A request the device cannot honour is refused (`strict`, for training) or, for inference on
    a checkpoint trained elsewhere, replaced by auto's choice."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    where = facts.describe()
    if precision == "fp32":
        return Precision("fp32", False, "asked for")
    refusal = None
    if facts.type == "mps":
        refusal = "cnnlab computes in fp32 on MPS (PyTorch's MPS autocast covers too few operations to rely on)"
    elif precision == "bf16" and facts.type == "cuda" and (facts.capability or (0, 0)) < BF16_ARITHMETIC:
        refusal = (f"the {where} has no bf16 arithmetic (it needs compute capability 8.0); use --precision fp16, "
                   "which its tensor cores are for, or auto")
    if refusal is not None and precision != "auto":
        if strict:
            raise ConfigError(f"precision={precision}: {refusal}")
        fallback = precision_policy("auto", facts)
        return replace(fallback, why=f"{precision} asked for, which this device cannot run; auto: {fallback.why}")
    if precision == "bf16":
        emulated = facts.type == "cpu" and not facts.cpu_bf16
        return Precision("bf16", False, "asked for" + ("; this CPU emulates bf16, slower than fp32" if emulated else ""))
    if precision == "fp16":
        note = ("; on the CPU fp16 is emulated and slower than fp32, there to test the GPU's path"
                if facts.type == "cpu" else "")
        return Precision("fp16", True, "asked for" + note)
    if facts.type == "cuda":
        capability = facts.capability or (0, 0)
        if capability >= BF16_ARITHMETIC:
            return Precision("bf16", False, f"auto: the {where} has bf16 arithmetic")
        if capability >= TENSOR_CORES:
            return Precision("fp16", True, f"auto: the {where} has fp16 tensor cores and no bf16")
        return Precision("fp32", False, f"auto: the {where} has no tensor cores, so half precision gains little")
    if facts.type == "cpu":
        if facts.cpu_bf16:
            return Precision("bf16", False, "auto: this CPU computes bf16 natively")
        return Precision("fp32", False, "auto: this CPU has no native bf16 (emulated bf16 is slower than fp32)")
    return Precision("fp32", False, f"auto: {refusal}")


def precision_for(precision: str, device: torch.device, strict: bool = True) -> Precision:
    """`precision_policy` for a resolved device."""
    return precision_policy(precision, device_facts(device), strict)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Inference's autocast dtype for a checkpoint trained with `precision` (which may be another device's)."""
    return precision_for(precision, device, strict=False).dtype


def grad_scaler(policy: Precision, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of a training step on `device`: fp16's loss scaling where the policy needs it, elsewhere
    disabled (its calls then do nothing more than the plain step), so the step has one path."""
    return torch.amp.GradScaler(device.type, enabled=policy.scaler)


def keeps_on_device(array_bytes: int, free_bytes: int) -> bool:
    """Whether a cache array is copied whole to GPU memory: when it takes under half of what is free, leaving the
    rest to the model, its activations and the optimiser."""
    return array_bytes < 0.5 * free_bytes


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to repeat its results (CUDA's documentation, "Reproducibility")


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning picks the fastest convolution algorithms for each shape (the first batches pay for the
    search); TF32 for the fp32 matrix products that autocast leaves. `deterministic` trades both for bit-identical
    repeats: cuDNN's deterministic algorithms, PyTorch's (an operation without one is refused, by name) and cuBLAS's
    fixed workspace (read when cuBLAS starts: a run sets it before its first CUDA work; a process that already used
    cuBLAS without it gets PyTorch's error naming CUBLAS_WORKSPACE_CONFIG). Set both ways on every run, so a sweep
    process's next trial starts clean. On the CPU nothing changes: its runs repeat as they are."""
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic


def decoder_choice(decoder: str, device_type: str, torchvision_decodes: bool) -> str:
    """Which decoder builds the image cache (nvjpeg or pil) for `decoder` (auto, pil, nvjpeg) on a device of
    `device_type`: auto takes nvJPEG on CUDA when torchvision still has its GPU decoder, else PIL."""
    if decoder == "nvjpeg" and device_type != "cuda":
        raise ConfigError(f"decoder=nvjpeg needs a CUDA device (device is {device_type}); use --decoder pil or auto")
    if decoder == "nvjpeg" and not torchvision_decodes:
        raise ConfigError("decoder=nvjpeg: this torchvision has no torchvision.io.decode_jpeg; use --decoder pil")
    if decoder == "nvjpeg" or (decoder == "auto" and device_type == "cuda" and torchvision_decodes):
        return "nvjpeg"
    return "pil"


def decode_device(decoder: str, device: torch.device) -> torch.device | None:
    """Where the cache build decodes JPEGs: None for PIL worker processes, a CUDA device for nvJPEG. torchvision is
    asked only for a GPU (importing it costs about 2 s of a run's start-up, and no CPU run decodes with it)."""
    decodes = device.type == "cuda" and torchvision_decodes_jpeg()
    return device if decoder_choice(decoder, device.type, decodes) == "nvjpeg" else None


def torchvision_decodes_jpeg() -> bool:
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


CPU_ALLOCATOR_FAILED = "DefaultCPUAllocator: can't allocate memory"  # PyTorch raises it as a plain RuntimeError


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory: CUDA's OutOfMemoryError, Python's MemoryError (NumPy's too),
    or the CPU allocator's RuntimeError (for which PyTorch has no type of its own)."""
    return (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or (isinstance(error, RuntimeError) and CPU_ALLOCATOR_FAILED in str(error)))


def release_memory(device: torch.device) -> None:
    """What an out-of-memory error left (the failed batch's tensors, cached CUDA blocks) given back, so the next trial
    of a sweep, or a probe of a smaller batch, starts from free memory."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failed_allocation(error: BaseException) -> str:
    """What the out-of-memory error says was asked for, briefly: the allocators' own messages run to a paragraph."""
    import re

    text = str(error)
    cpu = re.search(r"tried to allocate (\d+) bytes", text)
    if cpu:
        return f"an allocation of {int(cpu.group(1)) / 2**20:,.0f} MiB failed"
    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if cuda:
        return f"an allocation of {cuda.group(1)} failed"
    return type(error).__name__


def largest_fitting_batch(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int, loss_fn: torch.nn.Module,
                          device: torch.device, precision: Precision) -> int | None:
    """The largest of batch_size/2, /4, ... for which one forward and backward pass of `model` on zeros of `shape`
    fits the device's memory now (None: not even one image). Its gradients are cleared again."""
    b = batch_size // 2
    while b >= 1:
        try:
            x = torch.zeros((b, *shape), device=device).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision.dtype):
                loss = loss_fn(model(x), torch.zeros(b, dtype=torch.long, device=device))
            loss.backward()
            return b
        except Exception as error:  # noqa: BLE001 - only out of memory means "try a smaller batch"
            if not is_out_of_memory(error):
                raise
        finally:
            model.zero_grad(set_to_none=True)
            x = loss = None
            release_memory(device)
        b //= 2
    return None
