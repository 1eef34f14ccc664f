"""Trainer faults: an output folder that cannot be written fails before any work; a disk that
fills up while the adapter is written fails cleanly, leaves the previous adapter byte for byte as
it was and no partial folder that the gateway could pick up. (SIGKILL + --resume:
tests/test_trainer_job.py::test_kill_and_resume.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from server.adapter_registry import AdapterRegistry
from tests.adapters_util import make_peft_adapter
from tests.test_trainer_job import ROOT, no_partial_folders, reference_file, tiny
from trainer.job import main

__all__ = ["reference_file"]  # the fixture, shared with the job tests


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("where", "needle"),
    [("under-a-file", "is a file"), ("proc", "not writable")],
)
def test_unwritable_output_fails_before_any_work(
    where: str, needle: str, tmp_path: Path, reference_file: Path, capsys, figures
) -> None:
    # Modes mean nothing to root (CI), so: a path under a regular file, and a kernel
    # filesystem where no one can create files.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "adapters" / "x" if where == "under-a-file" else Path("/proc/vbon-x/y")
    args = tiny(reference_file, tmp_path, "x")
    args[args.index("--output") + 1] = str(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err, err
    assert not (tmp_path / "runs").exists()
    figures.add(f"trainer: unwritable output ({where})", faults=1, survived=1, note="exit 2")


def _limit_file_size(max_bytes: int):
    def apply() -> None:
        # Writes past the limit fail with EFBIG (Python ignores SIGXFSZ): a disk that fills up.
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_disk_full_while_publishing_keeps_the_previous_adapter(
    tmp_path: Path, reference_file: Path, embedded_model: Path, figures
) -> None:
    out = tmp_path / "adapters" / "vbon-disk"
    make_peft_adapter(embedded_model, out, n=4, rank=4)
    before = digest(out)
    # No checkpoints and TRL's own rollouts (a rollout engine writes caches and LoRA copies,
    # and would meet the limit first), so the first large write is the new adapter's weights
    # (~2 MB) while publishing: the moment a full disk could hurt the adapter being served.
    args = tiny(
        reference_file, tmp_path, "vbon-disk", "--overwrite", "--checkpoint-every", "99",
        "--steps", "1", "--rollouts", "transformers",
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_limit_file_size(512 * 1024),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: writing failed" in proc.stderr and "--resume" in proc.stderr
    assert digest(out) == before, "the previous adapter changed"
    assert no_partial_folders(out.parent)
    registry = AdapterRegistry(out.parent, max_rank=16)
    asyncio.run(registry.scan())
    assert [v.name for v in registry.all()] == ["vbon-disk"]
    figures.add(
        "trainer: disk full while publishing", faults=1, survived=1,
        note="exit 1, previous adapter intact",
    )  # fmt: skip
