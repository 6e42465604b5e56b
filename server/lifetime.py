"""Tie a child process's life to its parent's (Linux)."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(signum: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies (even
    of SIGKILL). False if the parent is already gone (``parent``: its pid, when
    known; otherwise being adopted by init counts as gone), or if it cannot be
    arranged on this system."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signum)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before prctl took effect.
    return os.getppid() == parent if parent is not None else os.getppid() != 1


def end_with_parent(parent: int) -> None:
    """For a process with nothing to save (a CPU pool process): SIGKILL when
    the parent dies, and exit now if it already has."""
    if not die_with_parent(signal.SIGKILL, parent) and os.getppid() != parent:
        os._exit(0)
