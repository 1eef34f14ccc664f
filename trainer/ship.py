"""Turn trained vBoN adapters into the ones vbon ships (vbon/data/adapters/<name>-shipped).

    python -m trainer.ship runs/ship/out/vbon-n8 runs/ship/out/vbon-n4 runs/ship/out/vbon-n16

Keeps only what serving needs (vbon.shipped.SERVING_FILES), with the LoRA weights in bfloat16
(half the size; the engine casts them to its dtype), the base model recorded by folder name
(no absolute path, also in adapter_config.json) and `shipped: true` in vbon.json, which lets an
adapter the user trains for the same N take precedence at the gateway. The recipe, seed, steps,
versions and base-weights fingerprint the trainer wrote are kept. Evaluate the shipped folders
afterwards (`python -m trainer.pareto --record`): the figures then describe the bf16 weights
that are served.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vbon.adapters import META_FILE, read_meta, staged_folder, validate_adapter, write_json_atomic
from vbon.errors import ConfigError
from vbon.shipped import SHIPPED_DIR

SUFFIX = "-shipped"


def ship(source: Path, dest_dir: Path = SHIPPED_DIR) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    meta = validate_adapter(source)
    if meta.method != "vbon" or not meta.n:
        raise ConfigError(f"'{source}' is not a vBoN adapter (method {meta.method})")
    if not meta.base_weights_sha256:
        raise ConfigError(
            f"'{source}' records no base_weights_sha256: retrain it with this version of the "
            "trainer, so the gateway can refuse it on other base weights"
        )
    name = f"vbon-n{meta.n}{SUFFIX}"
    target = dest_dir / name
    with staged_folder(target, overwrite=True) as tmp:
        weights = load_file(str(source / "adapter_model.safetensors"))
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((source / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = Path(meta.base_model).name
        write_json_atomic(tmp / "adapter_config.json", config)
        shipped = meta.model_copy(update={
            "name": name, "shipped": True, "base_model": Path(meta.base_model).name,
        })
        write_json_atomic(tmp / META_FILE, shipped.model_dump(mode="json"))
        validate_adapter(tmp)
        for f in tmp.iterdir():  # safetensors writes 0600: readable by every user who serves it
            f.chmod(0o644)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.ship", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", type=Path, help="trained vBoN adapter folders")
    parser.add_argument("--dest", type=Path, default=SHIPPED_DIR, help="where shipped ones go")
    args = parser.parse_args(argv)
    try:
        for src in args.adapters:
            out = ship(src, args.dest)
            print(f"{out} (n={read_meta(out).n})")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
