"""The adapter folder contract between the trainer (writer) and the gateway (reader).

An adapter folder holds peft's files (adapter_config.json, adapter_model.safetensors) and
`vbon.json` (AdapterMeta). The trainer writes it into a temporary sibling folder and renames it
into place when complete (`publish_adapter`), so a reader never sees half an adapter;
`validate_adapter` refuses anything else (half-copied, corrupted, or for another base model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from vbon.errors import ConfigError

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


@contextmanager
def staged_folder(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it into place atomically.

    On error the temporary folder is removed and `final` is untouched. With overwrite, an
    existing `final` is replaced only after the new one is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise ConfigError(f"output folder '{final}' exists: choose another or pass --overwrite")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden sibling, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
