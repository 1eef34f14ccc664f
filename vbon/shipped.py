"""The vBoN adapters shipped with vbon, so that /v1/vbon answers on a fresh machine.

`vbon/data/adapters/<name>/` holds, per N (4, 8, 16), a LoRA adapter for the embedded model,
trained once by `python -m trainer --recipe vbon-n<N>` (trainer/recipes/), its weights stored in
bfloat16 (half the size; vLLM and peft cast them to the engine's dtype), with `vbon.json`
saying how it was made (recipe, seed, steps, versions, the base weights' fingerprint) and its
measured evaluation.

At start the gateway copies each one that is missing into VBON_ADAPTERS_DIR (atomically: a
hidden sibling renamed into place), then serves it like any other adapter. A user's adapter of
the same N takes precedence (server.adapter_registry). Installed copies are never overwritten,
so a user who edits or deletes one keeps control: a deleted one comes back at the next start
unless VBON_SHIPPED_ADAPTERS=false.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from vbon.adapters import META_FILE, read_meta, staged_folder
from vbon.errors import ConfigError

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "data" / "adapters"
# What serving needs; the training curves and config stay in the repo's docs/results.
SERVING_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)


def install_shipped(
    adapters_dir: Path, base_model: str, source: Path = SHIPPED_DIR
) -> list[str]:
    """Copy each shipped adapter for `base_model` (matched by folder name: the shipped ones
    are for the embedded model) that `adapters_dir` lacks into it; returns the names copied.
    A name already there (installed before, or the user's own folder) is left alone."""
    installed = []
    folders = sorted(p for p in source.iterdir() if (p / META_FILE).is_file()) \
        if source.is_dir() else []
    for folder in folders:
        target = adapters_dir / folder.name
        if target.exists() or read_meta(folder).base_model != Path(base_model).name:
            continue
        try:
            with staged_folder(target) as tmp:
                for name in SERVING_FILES:
                    shutil.copy2(folder / name, tmp / name)
        except ConfigError:  # another gateway on the same volume was quicker
            continue
        except OSError as exc:  # a read-only volume: serve what is there, say why
            logger.warning("shipped adapter %s not installed into %s: %s", folder.name,
                           adapters_dir, exc)
            continue
        installed.append(folder.name)
        logger.info("installed shipped adapter %s into %s", folder.name, adapters_dir)
    return installed
