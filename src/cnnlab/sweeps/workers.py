"""Several sweep processes on one machine, sharing one study: one launcher creates the study and hands each
worker process its work as data."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..processes import end_with_parent

if TYPE_CHECKING:  # a type only: `cnnlab --help` reads WORKER_COMMAND without the model registry (torch)
    from .schema import Sweep

WORKER_COMMAND = "sweep-worker"  # the CLI command a worker process runs: `cnnlab sweep-worker < job.json`


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


def launch_workers(sweep: Sweep, base: dict[str, Any], sweeps_dir: Path, workers: int, count_each: int | None,
                   storage: str | None = None, seed: int = 0, progress: bool = False,
                   log: Callable[[str], None] = print, gpus: list[str] | None = None, budget: float | None = None,
                   verify: int = 0) -> int:
    """The one sweep launcher (`cnnlab sweep --workers N`, `cnnlab assignment --workers N`): the sweep folder
    sweeps_dir/<name> and its study are made (a grid queued) once here, then `workers` processes join it and each runs
    `count_each` trials (None: until run_cap or the grid is done). Each is handed its work as data, a JSON
    `WorkerJob` on its stdin, and the storage URL (which may hold a password) in its environment, never on a
    command line. With a `budget` (seconds), the workers plan their trials to end by its deadline together, keeping
    the time of `verify` x 3 runs for the verification after them. Returns the highest exit code of the workers."""
    from .engine import prepare_sweep
    from .storage import STORAGE_VARIABLE, storage_url

    prepare_sweep(sweep, base, Path(sweeps_dir) / sweep.name, storage, seed, progress, log)
    job = WorkerJob(sweep.validated, base, str(sweeps_dir), count_each, seed, budget, verify, workers)
    url = storage_url(storage)
    return spawn_workers(job, workers, {STORAGE_VARIABLE: url} if url else {}, gpus)


@dataclass(frozen=True)
class WorkerJob:
    """What each worker process of a sweep runs, as data: `cnnlab.sweep(sweep, count=count, sweeps_dir=sweeps_dir,
    sampler_seed=seed, **base)`."""

    sweep: dict[str, Any]  # the sweep file's validated part, with its name (never its ignored keys)
    base: dict[str, Any]  # the config values every trial starts from
    sweeps_dir: str
    count: int | None
    seed: int
    budget: float | None = None  # seconds for the whole sweep (None: the sweep file's, if any)
    verify: int = 0  # the top configurations verified after the workers end: their time is kept aside
    workers: int = 1  # how many processes share the sweep (and its budget)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerJob:
        return cls(**json.loads(text))


def spawn_workers(job: WorkerJob, workers: int, env: Mapping[str, str], gpus: list[str] | None = None) -> int:
    """Run `workers` processes of `job` (`cnnlab sweep-worker`, reading it from stdin) sharing the study; wait."""
    gpus = visible_gpus(os.environ) if gpus is None else gpus
    envs = worker_envs(workers, {**os.environ, **env}, gpus, os.cpu_count() or 1)
    if len(gpus) > 1:
        print(f"{workers} workers on {len(gpus)} GPUs: " + ", ".join(
            f"worker {i} on GPU {e['CUDA_VISIBLE_DEVICES']}" for i, e in enumerate(envs)), flush=True)
    # SIGTERM when this process dies, even by kill -9: a worker then ends its trial as on Ctrl-C, and none lingers
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", WORKER_COMMAND], env=env, stdin=subprocess.PIPE,
                              text=True, preexec_fn=functools.partial(end_with_parent, os.getpid(), signal.SIGTERM))
             for env in envs]
    try:
        for p in procs:
            try:
                p.stdin.write(job.to_json())
                p.stdin.close()  # its end of input: the worker reads the whole job, then starts
            except BrokenPipeError:  # it ended before reading (its exit code says why)
                pass
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    return max(codes)
