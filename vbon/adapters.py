"""The adapter folder contract between the trainer (writer) and the gateway (reader).

An adapter folder holds peft's files (adapter_config.json, adapter_model.safetensors) and
`vbon.json` (AdapterMeta). The trainer writes it into a temporary sibling folder, fsyncs it, and
moves it into place in one atomic step when complete (`staged_folder`), so a reader polling the
folder (the gateway's hot reload) never sees half an adapter nor, on --overwrite, no adapter;
`validate_adapter` refuses anything else (half-copied, corrupted, or for another base model).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from vbon.errors import ConfigError

logger = logging.getLogger(__name__)

META_FILE = "vbon.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterMeta(BaseModel):
    """What the gateway reports about an adapter, and what the evaluation compares."""

    name: str = Field(description="Adapter name, also its folder name.")
    method: Literal["vbon", "kl-rl", "bon-sft"] = "vbon"
    objective: Literal["bound", "exact"] | None = "bound"
    n: int | None = Field(None, description="N of the BoN distribution it imitates.")
    beta: float | None = Field(None, description="KL weight; 1/(N-1) for vBoN.")
    m: int | None = Field(None, description="Reference samples per prompt for F-hat.")
    base_model: str = Field(
        description="Base model the adapter was trained on: its folder's name (portable: no "
        "absolute path), or a hub id."
    )
    base_weights_sha256: str | None = Field(
        None,
        description="Fingerprint of the base weights (vbon.base_weights); the gateway refuses "
        "the adapter on other weights. None: not checked (older adapters, hub bases).",
    )
    reward: str = "vader"
    prompts_sha256: str | None = None
    steps: int | None = None
    seed: int | None = None
    lora_rank: int | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str | None = None
    recipe: dict[str, Any] | None = Field(
        None,
        description="How it was made: the command, the recipe file (repo-relative) and its "
        "sha256, so `python -m trainer --recipe ...` reproduces it.",
    )
    shipped: bool = Field(
        False,
        description="Shipped with vbon (vbon/data/adapters). An adapter the user trains for the "
        "same N takes precedence over a shipped one.",
    )


def check_name(name: str) -> str:
    """Adapter names come from requests: only plain names, never paths."""
    if not NAME_RE.match(name):
        raise ConfigError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def read_meta(folder: Path) -> AdapterMeta:
    try:
        return AdapterMeta.model_validate_json((folder / META_FILE).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"adapter '{folder}' has no {META_FILE}") from exc
    except (ValidationError, ValueError) as exc:
        raise ConfigError(f"adapter '{folder}' has an invalid {META_FILE}: {exc}") from exc


def validate_adapter(folder: Path, max_rank: int | None = None) -> AdapterMeta:
    """Check that `folder` is a complete, loadable LoRA adapter; raise ConfigError if not."""
    if not folder.is_dir():
        raise ConfigError(f"adapter folder '{folder}' does not exist")
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"adapter '{folder}' has no adapter_config.json") from exc
    except ValueError as exc:
        raise ConfigError(f"adapter '{folder}' has a corrupt adapter_config.json") from exc
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"adapter '{folder}' has no adapter_model.safetensors")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ConfigError(f"adapter '{folder}' has empty weights")
            for k in keys:  # reading every tensor catches truncated files
                f.get_tensor(k)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"adapter '{folder}' has corrupt weights ({exc})") from exc
    rank = int(cfg.get("r", 0))
    if max_rank is not None and rank > max_rank:
        raise ConfigError(
            f"adapter '{folder}' has LoRA rank {rank} above the engine's max_lora_rank "
            f"{max_rank}: raise VBON_MAX_LORA_RANK"
        )
    return read_meta(folder)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (the names created or renamed in it), to
    disk: a rename is atomic for readers, but only an fsync makes it survive a crash."""
    is_dir = path.is_dir()
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a folder; its files are synced
        if not (is_dir and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then each folder (after its entries)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


# Errors that mean "this OS or filesystem cannot exchange two names" (no renameat2, or a
# filesystem without RENAME_EXCHANGE such as NFS), as opposed to a real failure.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE): a
    reader of either name sees the old entry or the new one, never none. Raises OSError with
    an errno in _NO_EXCHANGE where the OS or the filesystem cannot do it."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def _versioned_sibling(final: Path) -> Path:
    """A hidden, unique sibling name for one published version of `final` (scans skip names
    that start with '.')."""
    return final.with_name(f".{final.name}@{time.time_ns()}-{os.getpid()}")


def _switch_link(tmp: Path, final: Path) -> Path | None:
    """`final` is a symlink: move `tmp` to a hidden versioned sibling and point `final` at it
    by renaming a new symlink over the old one, which is atomic on every POSIX filesystem
    (NFS included). Returns the previous version's folder when it is one of ours."""
    previous = os.readlink(final)
    version = _versioned_sibling(final)
    os.rename(tmp, version)
    link = final.with_name(f".{final.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)  # relative: the same link works under any mount point
    os.replace(link, final)
    old = final.parent / previous
    ours = old.parent == final.parent and old.name.startswith(f".{final.name}@")
    return old if ours else None  # a user's own symlink target is never deleted


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Put the complete folder `tmp` in place of the existing `final` so that a reader of
    `final` sees the previous version or the new one at every instant. Returns the folder that
    now holds the previous version (to delete), if any."""
    if final.is_symlink():
        return _switch_link(tmp, final)
    try:
        rename_exchange(tmp, final)
        return tmp  # the exchange left the previous version under the temporary name
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
    # No atomic exchange here (NFS and most network filesystems, non-Linux systems): turn
    # `final` into a symlink to a hidden versioned folder, which later overwrites switch
    # atomically (_switch_link). This first replacement of a real folder cannot be atomic:
    # for an instant between the two renames the name is missing.
    logger.warning(
        "%s: this filesystem cannot exchange two folders atomically; publishing it as a "
        "symlink to a hidden versioned folder, so that later overwrites are atomic",
        final,
    )
    version = _versioned_sibling(final)
    os.rename(tmp, version)
    link = final.with_name(f".{final.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    os.replace(link, final)
    return old


@contextmanager
def staged_folder(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success fsync it and move it into place in
    one atomic step.

    On error the temporary folder is removed and `final` is untouched. With overwrite, an
    existing `final` is replaced only after the new one is complete, and atomically: a reader
    (the gateway polling the adapters folder) sees the old version or the new one, never no
    folder and never half of one (`_swap_in`; on a filesystem without RENAME_EXCHANGE, such as
    NFS, from the second overwrite of a folder on)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(final) and not overwrite:
        raise ConfigError(f"output folder '{final}' exists: choose another or pass --overwrite")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        # Durable before visible: after a crash the published name never points at files
        # whose data did not reach the disk.
        fsync_tree(tmp)
        if os.path.lexists(final):
            if not overwrite:  # appeared while we wrote
                raise ConfigError(f"output folder '{final}' exists: choose another or pass "
                                  "--overwrite")
            old = _swap_in(tmp, final)
        else:
            os.rename(tmp, final)
        fsync_path(final.parent)  # the new name (or link) itself
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.lexists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden sibling, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the new name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
