"""Several sweep processes on one machine, sharing one study (each runs the same command with --workers 1)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from typing import Mapping

from ..processes import end_with_parent


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The CUDA devices a child process may use, as CUDA_VISIBLE_DEVICES names them (the parent's own list when it
    has one, else 0..n-1 for the n devices torch sees); [] on a machine without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[:count] if given else [str(i) for i in range(count)]


def worker_envs(workers: int, env: Mapping[str, str], gpus: list[str], cores: int) -> list[dict[str, str]]:
    """Each worker's environment: an equal share of the CPU cores, and worker i on GPU i mod n where there are n
    (each sees only its own device, as cuda:0), so no GPU idles while another runs two trials at once."""
    envs = []
    for i in range(workers):
        own = {**env, "CNNLAB_THREADS": str(max(1, cores // workers)), "CNNLAB_WORKER": str(i)}
        if gpus:
            own["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        envs.append(own)
    return envs


def spawn_workers(argv: list[str], workers: int, gpus: list[str] | None = None) -> int:
    """Run `workers` copies of this sweep command as separate processes sharing the study; wait for them."""
    gpus = visible_gpus(os.environ) if gpus is None else gpus
    envs = worker_envs(workers, os.environ, gpus, os.cpu_count() or 1)
    if len(gpus) > 1:
        print(f"{workers} workers on {len(gpus)} GPUs: " + ", ".join(
            f"worker {i} on GPU {e['CUDA_VISIBLE_DEVICES']}" for i, e in enumerate(envs)), flush=True)
    # SIGTERM when this process dies, even by kill -9: a worker then ends its trial as on Ctrl-C, and none lingers
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *argv, "--workers", "1"], env=env,
                              preexec_fn=functools.partial(end_with_parent, os.getpid(), signal.SIGTERM))
             for env in envs]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    return max(codes)
