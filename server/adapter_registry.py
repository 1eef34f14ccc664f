"""Installed vBoN adapters: found in VBON_ADAPTERS_DIR, validated, versioned, hot-swapped.

Each complete adapter folder becomes a version with its own LoRA id, served from an immutable
snapshot copy, so that requests in flight keep a valid path and their weights even when the
trainer replaces or removes the folder. A folder that fails validation (half-copied, corrupt,
another base model, other base weights) is refused and the previous version keeps serving.

Where the snapshots live:
- local engine: a private folder under the system's temporary folder;
- remote upstreams (a backend with `shared_snapshots`): `VBON_ADAPTERS_DIR/.versions/<name>@vN`
  on the shared adapters volume, which the upstreams load by path. The live folder may by then
  hold a newer or a refused version, so loading it again after an upstream restarts would serve
  other weights under the old version's name. N is claimed on the volume (an atomic mkdir), so
  that no two gateways, and no restarted gateway, ever give one name to different weights.

Snapshots are removed as soon as nothing can use them: a version that is no longer current
(replaced or removed) keeps its snapshot while a request still holds it. Every lookup that
serves a request (`get`, `for_n`, `default`) hands out its own copy of the version, and that
copy's lifetime is the request's hold: when the last copy of a superseded version is gone (the
request ended, however it ended), its snapshot is deleted (and, remote, the upstreams unload
it). The hold starts at the lookup, not at the engine call, because the routes resolve the
adapter before several awaits (a stream's response starts later, a multi-prompt request
generates prompt after prompt), and the engine may read the snapshot again at any of them (vLLM
reloads an evicted LoRA from its path).

Precedence for a given N (`for_n`, and the default adapter): an adapter the user trained beats a
shipped one (vbon.json `shipped`, installed by vbon.shipped), then the newest version wins. So
`python -m trainer --n 8` takes over `vbon-8` from the shipped vBoN-8 as soon as it is published,
and removing it hands `vbon-8` back to the shipped one."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.backend import LoraRef
from vbon.adapters import (
    META_FILE,
    AdapterMeta,
    check_name,
    fsync_path,
    fsync_tree,
    validate_adapter,
)
from vbon.base_weights import short, weights_sha256
from vbon.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_N = 8  # the default adapter, when VBON_DEFAULT_ADAPTER names none
SHARED_SNAPSHOTS = ".versions"  # under VBON_ADAPTERS_DIR; hidden, so scans skip it
# A shared snapshot being copied is a hidden temporary folder for seconds; one this old was
# left by a gateway that died while copying (another gateway may be copying right now).
STALE_STAGING_S = 3600.0


# An absolute path: a '/' that continues no word, URL or relative path ("http://host/x",
# "VBON_ADAPTERS_DIR/.versions"), up to a quote, a space, a bracket or a colon.
_ABS_PATH = re.compile(r"(?<![\w.~/:-])/[^\s'\"()\[\],;:]+")


def _without_paths(text: str) -> str:
    """`text` with each absolute path cut to its last part ('/srv/adapters/vbon-n8' becomes
    'vbon-n8'): the reason stays readable, where the files lie on this server is not told."""
    return _ABS_PATH.sub(lambda m: Path(m.group()).name or m.group(), text)


def _refusal(name: str, exc: Exception) -> str:
    """Why adapter `name` is refused, as /ready shows it; the log gets the whole exception.
    Ours (ConfigError) say what to fix, so they stay, less the server's paths; any other
    exception's text is internals and can hold paths, so it is only referenced."""
    if isinstance(exc, ConfigError):
        logger.warning("adapter %s refused: %s", name, exc)
        return _without_paths(str(exc))
    from server.serving import new_id  # (server.serving imports this module)

    ref = new_id("err")
    logger.warning("adapter %s refused [%s]: %s", name, ref, exc, exc_info=exc)
    return f"cannot load; the server log has the details under {ref}"


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


class _Changed(ConfigError):
    """The folder changed while being installed (a publish in progress): try again at the next
    scan, without reporting it as refused."""


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
        self.refused: dict[str, tuple[tuple[Any, ...], str]] = {}  # name -> (content, why)
        # Remote upstreams read the snapshots by path: they must be on the shared volume.
        self.shared = bool(getattr(backend, "shared_snapshots", False))
        self._private: Path | None = None  # the local snapshots' folder, made on first use
        self._swept = False  # stale temporary folders in the shared one removed (once)
        # Holds: LoRA id -> copies handed out and alive. Superseded versions wait in
        # _superseded until their count drops to 0. Only the event loop's thread changes
        # them; the finalizers of dying copies (any thread, any moment) only append to
        # _released, a deque (thread-safe appends), and wake the loop.
        self._held: dict[int, int] = {}
        self._superseded: dict[int, AdapterVersion] = {}
        self._released: collections.deque[int] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    # -- lookups (event loop, no I/O) ---------------------------------------------------
    def all(self) -> list[AdapterVersion]:
        """The current versions, for listings (no hold: not for serving a request)."""
        return sorted(self._versions.values(), key=lambda v: v.name)

    def _hold(self, v: AdapterVersion) -> AdapterVersion:
        """A copy of `v` for one request. Its snapshot stays on disk while this copy, or its
        `ref` (what the engine calls receive), is referenced anywhere."""
        ref = dataclasses.replace(v.ref)  # a new object, whose lifetime is the hold
        lora_id = v.ref.lora_id
        self._held[lora_id] = self._held.get(lora_id, 0) + 1
        weakref.finalize(ref, self._on_release, lora_id).atexit = False
        return dataclasses.replace(v, ref=ref)

    def get(self, name: str) -> AdapterVersion:
        check_name(name)
        try:
            return self._hold(self._versions[name])
        except KeyError:
            raise LookupError(
                f"no adapter named '{name}'; installed: {sorted(self._versions) or 'none'}"
            ) from None

    @staticmethod
    def _precedence(v: AdapterVersion) -> tuple[bool, int]:
        """User-trained before shipped, then the newest (LoRA ids grow with each install;
        remote version numbers count per name, so they cannot order two names)."""
        return (not v.meta.shipped, v.ref.lora_id)

    def for_n(self, n: int) -> AdapterVersion:
        matches = [v for v in self._versions.values() if v.meta.method == "vbon" and v.meta.n == n]
        if not matches:
            have = sorted({v.meta.n for v in self._versions.values() if v.meta.n})
            raise LookupError(
                f"no vBoN adapter for n={n}; adapters exist for n in {have or 'none'}"
            )
        return self._hold(max(matches, key=self._precedence))

    def default(self) -> AdapterVersion:
        """VBON_DEFAULT_ADAPTER if installed; else vBoN-8 (the paper's headline N and the
        trainer's default); else the adapter of highest precedence."""
        if self.default_name and self.default_name in self._versions:
            return self._hold(self._versions[self.default_name])
        if not self._versions:
            raise LookupError(
                f"no vBoN adapter is installed: train one (python -m trainer --n 8) or copy an "
                f"adapter folder into {self.adapters_dir}"
            )
        try:
            return self.for_n(DEFAULT_N)
        except LookupError:
            return self._hold(max(self._versions.values(), key=self._precedence))

    # -- holds and retirement -----------------------------------------------------------
    def _on_release(self, lora_id: int) -> None:
        """Finalizer of a handed-out copy: may run in any thread, inside any code (a garbage
        collection), so it only records the release and wakes the event loop."""
        self._released.append(lora_id)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: the next scan settles it
                loop.call_soon_threadsafe(self._settle_soon)

    def _settle(self) -> list[AdapterVersion]:
        """Count the releases; return the superseded versions nothing holds any more."""
        free = []
        while self._released:
            lora_id = self._released.popleft()
            left = self._held.get(lora_id, 0) - 1
            if left > 0:
                self._held[lora_id] = left
                continue
            self._held.pop(lora_id, None)
            if lora_id in self._superseded:
                free.append(self._superseded.pop(lora_id))
        return free

    def _settle_soon(self) -> None:
        for v in self._settle():
            task = asyncio.get_running_loop().create_task(self._retire(v))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def settled(self) -> None:
        """Wait until the snapshots of released versions are deleted (for tests)."""
        await asyncio.sleep(0)  # let pending release callbacks run
        self._settle_soon()
        while pending := [t for t in self._retiring if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _supersede(self, v: AdapterVersion) -> None:
        """`v` is no longer current: delete its snapshot now, or when its last hold ends."""
        if self._held.get(v.ref.lora_id, 0) > 0:
            self._superseded[v.ref.lora_id] = v
        else:
            await self._retire(v)

    async def _retire(self, v: AdapterVersion) -> None:
        """Never raises (it also runs as a background task): a failure is logged."""
        if self.backend is not None and hasattr(self.backend, "unload_lora"):
            try:  # (remote: the upstreams forget the name, so they never reload it)
                await self.backend.unload_lora(v.ref)
            except Exception:
                logger.warning("adapter %s: unloading failed", v.ref.name, exc_info=True)
        await asyncio.to_thread(self._delete_snapshot, Path(v.ref.path))
        logger.info("adapter %s: snapshot deleted", v.ref.name)

    def _delete_snapshot(self, snap: Path) -> None:
        if not self.shared:
            shutil.rmtree(snap, ignore_errors=True)
            return
        # Shared: delete the contents but keep the empty folder, so that its version number
        # stays taken on the volume (_claim) and the name never comes back with other weights.
        try:
            for child in snap.iterdir() if snap.is_dir() else ():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("snapshot %s not deleted: %s", snap, exc)

    # -- snapshots (blocking: run in a thread) ------------------------------------------
    def _snapshot_root(self) -> Path:
        if self.shared:
            root = self.adapters_dir / SHARED_SNAPSHOTS
            try:
                root.mkdir(exist_ok=True)
            except OSError as exc:
                raise ConfigError(self._not_writable(root, exc)) from exc
            if not self._swept:
                self._swept = True
                now = time.time()
                for p in root.glob(".*.tmp-*"):
                    with contextlib.suppress(OSError):
                        if now - p.stat().st_mtime > STALE_STAGING_S:
                            shutil.rmtree(p, ignore_errors=True)
            return root
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="vbon-adapters-"))
        return self._private

    @staticmethod
    def _not_writable(root: Path, exc: OSError) -> str:
        return (
            f"cannot write the version snapshot that the upstreams load into '{root}' ({exc}): "
            "the gateway pins each adapter version it serves as a copy under "
            f"VBON_ADAPTERS_DIR/{SHARED_SNAPSHOTS}; mount the adapters volume read-write for the "
            "gateway (the upstreams may keep it read-only)"
        )

    def _claim(self, staging: Path, name: str) -> tuple[int, Path]:
        """Give the complete snapshot `staging` its final name `<name>@v<N>`, N one above every
        number taken on the volume (by any gateway, ever: emptied snapshots keep their
        folder). mkdir is atomic also on NFS, so two gateways never claim the same N; the
        snapshot then replaces the claimed empty folder in one rename."""
        root = staging.parent
        taken = re.compile(re.escape(name) + r"@v(\d+)")
        while True:
            numbers = [int(m.group(1)) for p in root.iterdir() if (m := taken.fullmatch(p.name))]
            n = max(numbers, default=0) + 1
            target = root / f"{name}@v{n}"
            try:
                target.mkdir()
            except FileExistsError:
                continue  # another gateway was quicker: take the next number
            os.replace(staging, target)
            fsync_path(root)
            return n, target

    def _prepare(self, folder: Path) -> tuple[AdapterMeta, Path, tuple[Any, ...], int | None]:
        """Validate `folder` and copy it into an immutable snapshot. Returns its metadata, the
        snapshot, the content fingerprint and (shared snapshots) the version number."""
        fp = _fingerprint(folder)
        check_name(folder.name)
        try:
            meta = validate_adapter(folder, max_rank=self.max_rank)
        except ConfigError:
            if _fingerprint(folder) != fp:
                raise _Changed(f"adapter '{folder.name}' changed while being installed") from None
            raise
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
        root = self._snapshot_root()
        # (Shared: a hidden name until complete and claimed. Private: final at once.)
        prefix = f".{folder.name}.tmp-" if self.shared else f"{folder.name}-"
        try:
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        except OSError as exc:
            if self.shared:
                raise ConfigError(self._not_writable(root, exc)) from exc
            raise
        try:
            try:
                shutil.copytree(folder, staging, dirs_exist_ok=True)
            except (OSError, shutil.Error) as exc:  # e.g. the publisher deleted a file
                if _fingerprint(folder) != fp:
                    raise _Changed(
                        f"adapter '{folder.name}' changed while being installed"
                    ) from None
                raise ConfigError(f"adapter '{folder.name}' cannot be copied: {exc}") from exc
            if _fingerprint(folder) != fp:  # changed while we copied: try again next scan
                raise _Changed(f"adapter '{folder.name}' changed while being installed")
            if not self.shared:
                return meta, staging, fp, None
            # Readable by the upstreams, which may run as another user (safetensors writes
            # 0600), and durable before its name appears.
            for path in [staging, *staging.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            fsync_tree(staging)
            n, snap = self._claim(staging, folder.name)
            return meta, snap, fp, n
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- scanning (blocking parts run in a thread) --------------------------------------
    def _candidates(self) -> dict[str, Path]:
        if not self.adapters_dir.is_dir():
            return {}
        return {
            p.name: p
            for p in sorted(self.adapters_dir.iterdir())
            if p.is_dir() and not p.name.startswith(".")
        }

    async def scan(self) -> dict[str, Any]:
        """Install new or changed adapters, drop removed ones. Returns what changed (the refused
        with their whole reasons, which `refused_reasons` gives without server paths)."""
        async with self._lock:
            self._loop = asyncio.get_running_loop()
            for v in self._settle():
                await self._retire(v)
            found = await asyncio.to_thread(self._candidates)
            added, refused = [], {}
            for name, folder in found.items():
                current = self._versions.get(name)
                fp = await asyncio.to_thread(_fingerprint, folder)
                if current is not None and current.fingerprint == fp:
                    continue
                if name in self.refused and self.refused[name][0] == fp:
                    continue  # already refused this exact content
                snap: Path | None = None
                try:
                    meta, snap, fp, number = await asyncio.to_thread(self._prepare, folder)
                    lora_id = next(self._ids)
                    version = number if number is not None else lora_id
                    ref = LoraRef(name=f"{name}@v{version}", lora_id=lora_id, path=str(snap))
                    if self.backend is not None and hasattr(self.backend, "load_lora"):
                        await self.backend.load_lora(ref)
                except _Changed as exc:  # a publish in progress: the next scan installs it
                    logger.info("%s; trying again at the next scan", exc)
                    continue
                except Exception as exc:  # refuse it; the previous version keeps serving
                    if snap is not None:  # never served: nothing holds it
                        await asyncio.to_thread(self._delete_snapshot, snap)
                    self.refused[name] = (fp, _refusal(name, exc))
                    # Whole, for the admin who asked for this scan (POST /admin/adapters/reload).
                    ours = isinstance(exc, ConfigError)
                    refused[name] = str(exc) if ours else f"cannot load: {exc}"
                    continue
                self.refused.pop(name, None)
                self._versions[name] = AdapterVersion(meta, version, ref, folder, fp)
                added.append(ref.name)
                logger.info("adapter %s installed as version %d", name, version)
                if current is not None:
                    await self._supersede(current)
            removed = [n for n in self._versions if n not in found]
            for n in removed:
                await self._supersede(self._versions.pop(n))
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
        """At shutdown (no request left): delete every snapshot this gateway made."""
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        if self.shared:
            for v in [*self._versions.values(), *self._superseded.values()]:
                with contextlib.suppress(OSError):
                    self._delete_snapshot(Path(v.ref.path))
