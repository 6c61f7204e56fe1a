"""How a process of ours that drives Ray ends: the ``mixmae`` command and the test session."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def end_process(status: int) -> NoReturn:
    """Exit with ``status`` as the interpreter would (non-daemon threads joined, exit handlers
    run, output flushed), then leave without finalizing the interpreter.

    A Ray driver keeps gRPC and GCS-client threads running after ``ray.shutdown()``; tearing
    the libraries down under them can crash a process whose work succeeded (Ray's own workers
    leave with ``os._exit`` for the same reason). Finalizing would also run the last garbage
    collections over every object torch and timm made, a second or more on 2 cores, to free
    what the process's end frees anyway."""
    for thread in threading.enumerate():
        if not thread.daemon and thread is not threading.current_thread():
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader has gone
            pass
    os._exit(status)
