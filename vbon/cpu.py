"""What this CPU can do fast, read once from /proc/cpuinfo."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_native_bf16() -> bool:
    """bf16 matmuls are native with AVX512-BF16 or AMX; elsewhere they run emulated, 4-5x
    slower than fp32, so fp32 is the faster choice there."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return "bfloat16" if has_native_bf16() else "float32"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
