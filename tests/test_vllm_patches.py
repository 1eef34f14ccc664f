"""The CPU LoRA ops of vbon's vLLM plugin compute what vLLM's own ops compute."""

from __future__ import annotations

import types

import pytest
import torch

from vbon.vllm_patches import make_lora_ops


@pytest.fixture(scope="module")
def ops():
    # The stock functions, even if the plugin already patched this process.
    import importlib

    import vllm.lora.ops.torch_ops.lora_ops as lora_ops

    fresh = importlib.reload(lora_ops)
    orig = types.SimpleNamespace(
        bgmv_shrink=fresh.bgmv_shrink,
        bgmv_expand=fresh.bgmv_expand,
        bgmv_expand_slice=fresh.bgmv_expand_slice,
    )
    return orig, make_lora_ops(orig)


@pytest.mark.parametrize(
    "indices", [[0] * 7, [1, 0, 1, 1, -1, 0, 1], [-1] * 7, [2, 2, 0, 1, 0, 2, 2]]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ops_match_vllm(ops, indices: list[int], dtype: torch.dtype) -> None:
    orig, new = ops
    torch.manual_seed(0)
    idx = torch.tensor(indices)
    x = torch.randn(7, 12, dtype=dtype)
    a = torch.randn(3, 1, 4, 12, dtype=dtype)  # shrink: adapters x 1 x rank x in
    b = torch.randn(3, 1, 10, 4, dtype=dtype)  # expand: adapters x 1 x out x rank
    h = torch.randn(7, 4, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}

    y1, y2 = torch.zeros(7, 4, dtype=dtype), torch.zeros(7, 4, dtype=dtype)
    orig.bgmv_shrink(x, a, y1, idx, 0.5)
    new["bgmv_shrink"](x, a, y2, idx, 0.5)
    torch.testing.assert_close(y2, y1, **tol)

    base = torch.randn(7, 10, dtype=dtype)
    for add in (True, False):
        z1, z2 = base.clone(), base.clone()
        orig.bgmv_expand(h, b, z1, idx, add)
        new["bgmv_expand"](h, b, z2, idx, add)
        torch.testing.assert_close(z2, z1, **tol)
        s1, s2 = torch.zeros(7, 24, dtype=dtype), torch.zeros(7, 24, dtype=dtype)
        orig.bgmv_expand_slice(h, b, s1, idx, 6, 10, add)
        new["bgmv_expand_slice"](h, b, s2, idx, 6, 10, add)
        torch.testing.assert_close(s2, s1, **tol)
