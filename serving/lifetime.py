"""Tie a child process's life to its parent's: Linux's parent-death signal, for server workers and launched servers.

A leaf (stdlib only), shared by serving.server.workers and serving.client.launch.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, however it dies.

    Not Linux (no prctl): nothing happens, and the parent's own clean-up still stops the child."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
