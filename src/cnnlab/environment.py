"""What this machine and installation are, as far as cnnlab's numbers depend on them: versions, the device and the
decisions taken for it (precision, decoder), the CPU's flags and the image cache. `cnnlab env` prints it for a
user to paste into a question; each run's provenance (summary.json) records the same facts."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .hardware import (
    DeviceFacts,
    decoder_choice,
    describe_machine,
    device_facts,
    precision_policy,
    torchvision_decodes_jpeg,
)

PACKAGES = ("torch", "torchvision", "timm", "numpy", "optuna", "onnxruntime", "wandb")


def package_versions() -> dict[str, str]:
    """cnnlab's and the versions of what computes its numbers (read from the installed metadata, nothing imported),
    with the CUDA and cuDNN that torch was built with where it was."""
    versions = {"cnnlab": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if cudnn:  # major * 10000 + minor * 100 + patch since cuDNN 9
            versions["cudnn"] = f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}" if cudnn >= 90000 else str(cudnn)
    return versions


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) under `folder`; (0, 0) where it does not exist."""
    total = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
                files += 1
            except OSError:  # removed meanwhile by another process (a cache being rebuilt)
                pass
    return total, files


def device_section(device: torch.device, facts: DeviceFacts) -> dict[str, Any]:
    section: dict[str, Any] = {"name": str(device), "type": facts.type}
    if facts.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        section.update(gpu=facts.name, compute_capability=".".join(map(str, facts.capability or ())),
                       memory_gib=round((facts.memory_bytes or 0) / 2**30, 1), free_gib=round(free / 2**30, 1))
    elif facts.type == "cpu":
        section["native_bf16"] = facts.cpu_bf16
    return section


def environment(device: torch.device, precision: str = "auto", decoder: str = "auto",
                cache_dir: Path | None = None) -> dict[str, Any]:
    """The facts `cnnlab env` prints, for a resolved `device` and the `precision` and `decoder` settings."""
    facts = device_facts(device)
    policy = precision_policy(precision, facts, strict=False)
    info: dict[str, Any] = {"versions": package_versions(), "machine": describe_machine(device),
                            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                            "device": device_section(device, facts), "precision": policy.to_dict(),
                            "decoder": decoder_choice(decoder, facts.type, torchvision_decodes_jpeg())}
    if cache_dir is not None:
        size, files = folder_size(cache_dir)
        info["cache"] = {"folder": str(cache_dir), "bytes": size, "files": files}
    return info


def environment_text(info: dict[str, Any]) -> str:
    """`environment`'s facts as the lines `cnnlab env` prints."""
    v, m, d, p = info["versions"], info["machine"], info["device"], info["precision"]
    lines = ["cnnlab " + v["cnnlab"] + ", python " + v["python"],
             "packages: " + ", ".join(f"{k} {v[k]}" for k in PACKAGES if k in v),
             (f"torch built with CUDA {v['cuda']}" + (f", cuDNN {v['cudnn']}" if "cudnn" in v else "")
              + f"; CUDA GPUs visible: {info['cuda_devices']}") if "cuda" in v else "torch built without CUDA",
             f"CPU: {m.get('cpu')}, {m.get('cores')} cores, flags of note: {', '.join(m.get('cpu_flags', [])) or 'none'}",
             f"platform: {m.get('platform')}"]
    if d["type"] == "cuda":
        lines.append(f"device: {d['name']}, {d['gpu']}, compute capability {d['compute_capability']}, "
                     f"{d['memory_gib']} GiB ({d['free_gib']} GiB free)")
    else:
        native = f" (native bf16: {'yes' if d['native_bf16'] else 'no'})" if "native_bf16" in d else ""
        lines.append(f"device: {d['name']}{native}")
    how = p["name"] + (" with a gradient scaler" if p["scaler"] else "")
    lines.append(f"precision: {how} ({p['why']})")
    lines.append(f"decoder: {info['decoder']}" + (" (JPEGs decoded on the GPU)" if info["decoder"] == "nvjpeg"
                                                  else " (worker processes)"))
    if "cache" in info:
        c = info["cache"]
        lines.append(f"cache: {c['folder']}, {c['bytes'] / 2**20:,.1f} MiB in {c['files']} files")
    return "\n".join(lines)
