"""Several sweep processes on one machine, sharing one study (each runs the same command with --workers 1)."""

from __future__ import annotations

import os
import subprocess
import sys


def spawn_workers(argv: list[str], workers: int) -> int:
    """Run `workers` copies of this sweep command as separate processes sharing the study; wait for them."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "CNNLAB_THREADS": str(max(1, cores // workers))}
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *argv, "--workers", "1"], env=env)
             for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    return max(codes)
