"""A fingerprint of a base model's weights, recorded in every adapter's vbon.json.

A LoRA adapter is a delta on particular weights: served on other ones (another conversion of the
GGUF, a bf16 copy, a fine-tune of the same architecture) it loads without error and generates
something else. The gateway compares this fingerprint with its own base model's and refuses an
adapter trained on other weights.

The hash covers the tensors, not the files: sha256 over each tensor's name, dtype, shape and
bytes, in name order, read straight from the safetensors files (no torch). Two folders with the
same tensors hash alike however they are sharded or whatever metadata their files carry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import struct
from pathlib import Path

PREFIX = "sha256:"


def weights_sha256(folder: str | Path) -> str | None:
    """'sha256:<hex>' of the model's tensors; None when `folder` is not a local folder of
    safetensors files (a hub id, or .bin weights): such a base cannot be fingerprinted."""
    path = Path(folder)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(str(path.resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _hash_files(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # `stamp` (names, sizes, mtimes) is part of the cache key: a rewritten file is hashed anew.
    tensors: dict[str, tuple[Path, dict]] = {}
    for name, _, _ in stamp:
        file = Path(folder) / name
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                tensors[key] = (file, {**info, "data_start": 8 + size})
    digest = hashlib.sha256()
    maps: dict[Path, mmap.mmap] = {}
    try:
        for key in sorted(tensors):
            file, info = tensors[key]
            if file not in maps:
                with file.open("rb") as fh:
                    maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            start, end = (info["data_start"] + o for o in info["data_offsets"])
            digest.update(json.dumps([key, info["dtype"], info["shape"]]).encode())
            digest.update(memoryview(maps[file])[start:end])
    finally:
        for m in maps.values():
            m.close()
    return PREFIX + digest.hexdigest()


def short(fingerprint: str | None) -> str:
    """The first 12 hex digits, for messages."""
    return fingerprint[len(PREFIX) : len(PREFIX) + 12] if fingerprint else "unknown"
