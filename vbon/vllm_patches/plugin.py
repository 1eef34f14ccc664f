"""The vLLM plugin: `register`, which vLLM calls in every process it starts, and `install`,
which installs the patches the settings want (through gate.py's version and signature gates).
"""

from __future__ import annotations

from vbon.vllm_patches import (
    cpu_seed_fix,
    fused_lora,
    grouped_lora_ops,
    single_adapter_lora,
)
from vbon.vllm_patches.gate import Patch, install_all, logger
from vbon.vllm_patches.orphan_guard import die_with_parent

# Every patch by name. Order matters: a patch comes after those it requires.
PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        cpu_seed_fix.PATCH,
        grouped_lora_ops.PATCH,
        fused_lora.PATCH,
        single_adapter_lora.PATCH,
    )
}


def install(*, fast_cpu_lora: bool = True, merged_lora_max_gb: float = 2.0) -> dict[str, bool]:
    """Install every patch that is wanted (the LoRA ones per the two settings, passed in by the
    caller: see vbon.settings.VllmPatchSettings) and fits this vLLM; name -> installed. Never
    raises for a patch that does not fit: it warns and leaves stock vLLM in place."""
    single_adapter_lora.set_merge_budget(merged_lora_max_gb)
    wanted = {
        "cpu_seed_fix": True,
        "grouped_lora_ops": fast_cpu_lora,
        "fused_lora": fast_cpu_lora,
        "single_adapter_lora": fast_cpu_lora and merged_lora_max_gb > 0,
    }
    return install_all(PATCHES, wanted, off_by="VBON_FAST_CPU_LORA/_MERGED_LORA_MAX_GB")


def register() -> None:
    """vLLM general-plugin hook: orphan protection everywhere, patches on the CPU platform."""
    try:
        die_with_parent()
    except Exception as exc:  # pragma: no cover - never stop the engine from starting
        logger.warning("vbon: parent watch not started: %s", exc)
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
    except Exception as exc:  # never let our plugin stop the engine from starting
        logger.warning("vbon: vLLM patches NOT installed, stock vLLM runs: %s", exc)
        return
    # This runs in processes vLLM spawned, which inherit the environment (and the working
    # directory, so .env) of the app that built the engine: the settings class reads them here.
    try:
        from vbon.settings import VllmPatchSettings

        settings = VllmPatchSettings()
        fast, budget = settings.fast_cpu_lora, settings.merged_lora_max_gb
    except Exception as exc:
        logger.warning(
            "vbon: invalid VBON_FAST_CPU_LORA / VBON_MERGED_LORA_MAX_GB (%s): vLLM's stock "
            "LoRA ops are used",
            exc,
        )
        fast, budget = False, 0.0
    try:
        install(fast_cpu_lora=fast, merged_lora_max_gb=budget)
    except Exception as exc:  # never let our plugin stop the engine from starting
        logger.warning("vbon: vLLM patches NOT installed, stock vLLM runs: %s", exc)
