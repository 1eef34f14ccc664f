"""Orphan guard: a process vLLM spawned (engine core, workers) exits when its parent dies.

The vLLM defect: vLLM shuts its engine down on a normal exit, but after the parent is killed
outright (SIGKILL, the OOM killer, a killed training job) the engine core and its workers live
on as orphans, holding gigabytes and the CPU (GPU memory on a GPU), until killed by hand. The
engine core has no parent-death check of its own: vllm-project/vllm#55510 (open; the same
class as #34643 and #19849; fixes proposed in #55846 and #34816, not merged in 0.32).

Unlike the patches, this replaces nothing in vLLM, so it needs no version gate: it runs on
every platform.
"""

from __future__ import annotations

import logging
import os

# The plugin's one logger (see gate.py).
logger = logging.getLogger(__package__)


def die_with_parent() -> bool:
    """In a process that vLLM spawned (engine core, workers): exit when the parent process
    dies; False in a process that multiprocessing did not start. A daemon thread waits on
    multiprocessing's parent sentinel (no polling; unlike prctl's parent-death signal it is
    not tied to the thread that spawned us)."""
    import multiprocessing
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or getattr(parent, "_sentinel", None) is None:
        return False

    def watch() -> None:
        wait([parent.sentinel])
        logger.warning("vbon: parent process %s is gone; exiting", parent.pid)
        os._exit(1)

    threading.Thread(target=watch, name="vbon-parent-watch", daemon=True).start()
    return True
