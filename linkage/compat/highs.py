"""A HiGHS model that prints nothing.

highspy prints its banner ("Running HiGHS ...", third-party notices) to the process's
standard output from C++ when a model is constructed, before any option can turn output
off, so every ``hhlink disclose`` and portal request printed it. :func:`quiet_highs`
constructs the model with file descriptor 1 pointed at ``/dev/null`` and then sets
``output_flag`` off, so solves stay silent too.
"""

from __future__ import annotations

import os
import sys
import threading

import highspy

__all__ = ["quiet_highs"]

_lock = threading.Lock()   # fd 1 is process-wide: one construction at a time


def quiet_highs() -> highspy.Highs:
    """A new ``highspy.Highs`` with its banner and solver log suppressed."""
    with _lock:
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
    h.setOptionValue("output_flag", False)
    return h
