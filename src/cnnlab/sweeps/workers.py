"""Several sweep processes on one machine, sharing one study (each runs the same command with --workers 1)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

from ..processes import end_with_parent


def spawn_workers(argv: list[str], workers: int) -> int:
    """Run `workers` copies of this sweep command as separate processes sharing the study; wait for them."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "CNNLAB_THREADS": str(max(1, cores // workers))}
    # SIGTERM when this process dies, even by kill -9: a worker then ends its trial as on Ctrl-C, and none lingers
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *argv, "--workers", "1"], env=env,
                              preexec_fn=functools.partial(end_with_parent, os.getpid(), signal.SIGTERM))
             for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    return max(codes)
