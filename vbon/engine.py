"""The one place that turns settings into a vLLM engine, for the gateway (AsyncLLM), the
trainer's reference sampling and the evaluation, vbon.evaluation (offline LLM).

CPU specifics live here as settings (thread binding, KV cache size, eager mode, preloads);
the code paths are the same on a GPU.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vbon.cpu import cpu_count, default_dtype
from vbon.settings import CoreSettings

logger = logging.getLogger(__name__)


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def resolve_dtype(settings: CoreSettings) -> str:
    return default_dtype() if settings.dtype == "auto" else settings.dtype


def _find_preloads() -> list[str]:
    """tcmalloc and Intel OpenMP, which vLLM-CPU recommends preloading, where installed."""
    found: list[str] = []
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    for name in ("tcmalloc_minimal", "tcmalloc"):
        lib = ctypes.util.find_library(name)
        if lib:
            for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"):
                if (Path(d) / lib).exists():
                    found.insert(0, str(Path(d) / lib))
                    break
            break
    return found


def cpu_environment(settings: CoreSettings) -> dict[str, str]:
    """Environment for vLLM-CPU's engine process (read there at start-up)."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gb),
        # vbon's vLLM plugin runs in the engine process and reads its settings from the
        # environment it inherits: pass on these two even when they were set in code.
        "VBON_FAST_CPU_LORA": str(settings.fast_cpu_lora),
        "VBON_MERGED_LORA_MAX_GB": str(settings.merged_lora_max_gb),
    }
    threads = settings.cpu_threads.strip().lower()
    if threads == "all":
        # Every core computes; by default vLLM reserves one of our two cores for the engine
        # loop, which halves generation speed here (77 -> 135 tokens/s measured).
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cpu_count() - 1}"
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    elif threads != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if settings.cpu_preload:
        preloads = _find_preloads()
        current = os.environ.get("LD_PRELOAD", "")
        extra = [p for p in preloads if p not in current]
        if extra:
            # The engine core is a spawned interpreter, so LD_PRELOAD set here applies there.
            env["LD_PRELOAD"] = ":".join([*extra, *([current] if current else [])])
    return env


def engine_kwargs(settings: CoreSettings, model_path: str | None = None) -> dict[str, Any]:
    """Keyword arguments shared by AsyncEngineArgs and LLM(...)."""
    model = model_path or settings.resolved_model()
    cpu = on_cpu()
    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=resolve_dtype(settings),
        max_model_len=settings.max_model_len,
        enable_lora=True,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        max_num_seqs=settings.max_num_seqs,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else cpu,
        seed=settings.seed,
        # Sampling defaults come from vbon.sampling only, never the model's
        # generation_config.json (which may set top_k, temperature or a repetition penalty).
        generation_config="vllm",
        max_logprobs=20,
    )
    if not cpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return kwargs


def prepare_environment(settings: CoreSettings) -> None:
    if on_cpu():
        for key, value in cpu_environment(settings).items():
            os.environ[key] = value
    logger.info("engine environment: %s", {k: v for k, v in os.environ.items() if "VLLM" in k})


def build_async_engine(settings: CoreSettings, model_path: str | None = None) -> Any:
    """An AsyncLLM (vLLM V1) for serving; call from the server's lifespan, never at import."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    prepare_environment(settings)
    args = AsyncEngineArgs(**engine_kwargs(settings, model_path), disable_log_stats=True)
    return AsyncLLM.from_engine_args(args)


def build_llm(settings: CoreSettings, model_path: str | None = None, **overrides: Any) -> Any:
    """An offline vLLM LLM for batch work (reference samples, evaluation). Callers need an
    `if __name__ == "__main__":` guard: vLLM starts its workers with spawn."""
    from vllm import LLM

    prepare_environment(settings)
    kwargs = engine_kwargs(settings, model_path)
    kwargs.update(overrides)
    return LLM(**kwargs)
