"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import os
import signal
import sys


def end_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """Called in a child: it gets `signum` when the process that forked it dies, however that one dies (kill -9
    included), so no decode worker or sweep worker outlives its run. Linux only (prctl PR_SET_PDEATHSIG);
    elsewhere the parent's own cleanup ends its children on every exit it survives."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
