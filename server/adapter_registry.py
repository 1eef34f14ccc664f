"""Installed vBoN adapters: found in VBON_ADAPTERS_DIR, validated, versioned, hot-swapped.

Each complete adapter folder becomes a version with its own LoRA id, served from a private
snapshot copy, so that requests in flight keep a valid path and their weights even when the
trainer replaces or removes the folder. A folder that fails validation (half-copied, corrupt,
another base model, other base weights) is refused and the previous version keeps serving.

Precedence for a given N (`for_n`, and the default adapter): an adapter the user trained beats a
shipped one (vbon.json `shipped`, installed by vbon.shipped), then the newest version wins. So
`python -m trainer --n 8` takes over `vbon-8` from the shipped vBoN-8 as soon as it is published,
and removing it hands `vbon-8` back to the shipped one."""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.backend import LoraRef
from vbon.adapters import META_FILE, AdapterMeta, check_name, validate_adapter
from vbon.base_weights import short, weights_sha256
from vbon.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_N = 8  # the default adapter, when VBON_DEFAULT_ADAPTER names none


@dataclass(frozen=True)
class AdapterVersion:
    meta: AdapterMeta
    version: int
    ref: LoraRef
    source: Path
    fingerprint: tuple[Any, ...]

    @property
    def name(self) -> str:
        return self.meta.name


def _fingerprint(folder: Path) -> tuple[Any, ...]:
    out = []
    for name in ("adapter_model.safetensors", "adapter_config.json", META_FILE):
        try:
            st = (folder / name).stat()
            out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((name, None))
    return tuple(out)


class AdapterRegistry:
    def __init__(
        self,
        adapters_dir: Path,
        max_rank: int,
        base_model: str = "",
        default: str | None = None,
        backend: Any = None,
    ) -> None:
        self.adapters_dir = adapters_dir
        self.max_rank = max_rank
        self.base_model = base_model
        self.default_name = default
        self.backend = backend
        self._ids = itertools.count(1)
        self._versions: dict[str, AdapterVersion] = {}
        self.refused: dict[str, str] = {}  # folder name -> why it is not served
        self._snapshots = Path(tempfile.mkdtemp(prefix="vbon-adapters-"))
        self._lock = asyncio.Lock()

    # -- lookups (event loop, no I/O) ---------------------------------------------------
    def all(self) -> list[AdapterVersion]:
        return sorted(self._versions.values(), key=lambda v: v.name)

    def get(self, name: str) -> AdapterVersion:
        check_name(name)
        try:
            return self._versions[name]
        except KeyError:
            raise LookupError(
                f"no adapter named '{name}'; installed: {sorted(self._versions) or 'none'}"
            ) from None

    @staticmethod
    def _precedence(v: AdapterVersion) -> tuple[bool, int]:
        """User-trained before shipped, then the newest."""
        return (not v.meta.shipped, v.version)

    def for_n(self, n: int) -> AdapterVersion:
        matches = [v for v in self._versions.values() if v.meta.method == "vbon" and v.meta.n == n]
        if not matches:
            have = sorted({v.meta.n for v in self._versions.values() if v.meta.n})
            raise LookupError(
                f"no vBoN adapter for n={n}; adapters exist for n in {have or 'none'}"
            )
        return max(matches, key=self._precedence)

    def default(self) -> AdapterVersion:
        """VBON_DEFAULT_ADAPTER if installed; else vBoN-8 (the paper's headline N and the
        trainer's default); else the adapter of highest precedence."""
        if self.default_name and self.default_name in self._versions:
            return self._versions[self.default_name]
        if not self._versions:
            raise LookupError(
                f"no vBoN adapter is installed: train one (python -m trainer --n 8) or copy an "
                f"adapter folder into {self.adapters_dir}"
            )
        try:
            return self.for_n(DEFAULT_N)
        except LookupError:
            return max(self._versions.values(), key=self._precedence)

    # -- scanning (blocking parts run in a thread) --------------------------------------
    def _candidates(self) -> dict[str, Path]:
        if not self.adapters_dir.is_dir():
            return {}
        return {
            p.name: p
            for p in sorted(self.adapters_dir.iterdir())
            if p.is_dir() and not p.name.startswith(".")
        }

    def _prepare(self, folder: Path) -> tuple[AdapterMeta, Path, tuple[Any, ...]]:
        fp = _fingerprint(folder)
        check_name(folder.name)
        meta = validate_adapter(folder, max_rank=self.max_rank)
        if meta.name != folder.name:
            meta = meta.model_copy(update={"name": folder.name})
        if self.base_model and Path(meta.base_model).name != Path(self.base_model).name:
            raise ConfigError(
                f"adapter '{folder.name}' was trained on '{meta.base_model}', but this server "
                f"serves '{self.base_model}'"
            )
        theirs = meta.base_weights_sha256
        # None where the base is not a local safetensors folder (remote upstreams, hub ids):
        # then only the base model's name is compared. Cached after the first adapter.
        ours = weights_sha256(self.base_model) if theirs and self.base_model else None
        if theirs and ours and theirs != ours:
            raise ConfigError(
                f"adapter '{folder.name}' was trained on other base weights (fingerprint "
                f"{short(theirs)}) than this server's '{Path(self.base_model).name}' "
                f"({short(ours)}): a LoRA delta on other weights generates "
                "something else. Retrain it on this base (python -m trainer --recipe ...) or "
                "serve the base it was trained on"
            )
        snap = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=self._snapshots))
        shutil.copytree(folder, snap, dirs_exist_ok=True)
        if _fingerprint(folder) != fp:  # changed while we copied: try again next scan
            shutil.rmtree(snap, ignore_errors=True)
            raise ConfigError(f"adapter '{folder.name}' changed while being installed")
        return meta, snap, fp

    async def scan(self) -> dict[str, Any]:
        """Install new or changed adapters, drop removed ones. Returns what changed."""
        async with self._lock:
            found = await asyncio.to_thread(self._candidates)
            added, refused = [], {}
            for name, folder in found.items():
                current = self._versions.get(name)
                fp = await asyncio.to_thread(_fingerprint, folder)
                if current is not None and current.fingerprint == fp:
                    continue
                if self.refused.get(name, ("",))[0] == fp:
                    continue  # already refused this exact content
                try:
                    meta, snap, fp = await asyncio.to_thread(self._prepare, folder)
                    lora_id = next(self._ids)
                    ref = LoraRef(name=f"{name}@v{lora_id}", lora_id=lora_id, path=str(snap))
                    if self.backend is not None and hasattr(self.backend, "load_lora"):
                        await self.backend.load_lora(ref)
                except Exception as exc:  # refuse it; the previous version keeps serving
                    msg = str(exc) if isinstance(exc, ConfigError) else f"cannot load: {exc}"
                    logger.warning("adapter %s refused: %s", name, msg)
                    self.refused[name] = (fp, msg)
                    refused[name] = msg
                    continue
                self.refused.pop(name, None)
                self._versions[name] = AdapterVersion(meta, lora_id, ref, folder, fp)
                added.append(f"{name}@v{lora_id}")
                logger.info("adapter %s installed as version %d", name, lora_id)
            removed = [n for n in self._versions if n not in found]
            for n in removed:
                del self._versions[n]
                logger.info("adapter %s removed", n)
            for n in [n for n in self.refused if n not in found]:
                del self.refused[n]
            return {"installed": added, "removed": removed, "refused": refused}

    def refused_reasons(self) -> dict[str, str]:
        return {k: v[1] for k, v in self.refused.items()}

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan()
            except Exception:  # keep watching; one bad scan must not stop hot reload
                logger.exception("adapter scan failed")

    def close(self) -> None:
        shutil.rmtree(self._snapshots, ignore_errors=True)
