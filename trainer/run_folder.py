"""The run folder (--work-dir/<adapter name>): the checks made before any long work (the
folders can be written, --resume continues the same run), run.json, and the newest complete
checkpoint that --resume continues from.

    runs/vbon-n8/run.json        identity (what --resume must match), config, versions
    runs/vbon-n8/checkpoints/    the trainer's checkpoints
    runs/vbon-n8/warm-start/     vbon's finished warm start (reused by --resume)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from trainer.jobspec import Job
from trainer.provenance import prompts_sha256, versions
from vbon.errors import ConfigError

RUN_FILE = "run.json"
WARM_START = "warm-start"
CHECKPOINTS = "checkpoints"


def check_writable(folder: Path, what: str) -> None:
    """Probe with a temporary file in the nearest existing ancestor (so nothing is left behind
    on failure); modes alone say nothing for root or a read-only mount."""
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} '{folder}' cannot be created: '{probe}' is a file")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as exc:
        raise ConfigError(
            f"{what} '{folder}' is not writable ({exc.strerror}): fix its permissions or "
            "choose another folder"
        ) from None


def run_identity(job: Job) -> dict[str, Any]:
    return {
        "config": job.cfg.run_identity(),
        "model_path": job.model_path,
        "prompts_sha256": prompts_sha256(job.openings),
        "sampling": job.sampling.to_dict(),
    }


def check_run_dir(job: Job) -> None:
    """--resume must continue the same run; a fresh run starts from an empty checkpoint folder."""
    run_dir = job.cfg.run_dir
    run_file = run_dir / RUN_FILE
    identity = run_identity(job)
    if job.cfg.resume:
        if not run_file.is_file():
            raise ConfigError(
                f"--resume: no earlier run in '{run_dir}' (no {RUN_FILE}); run without --resume"
            )
        saved = json.loads(run_file.read_text())["identity"]
        saved_cfg, new_cfg = saved.get("config", {}), identity["config"]
        diffs = [
            f"{k}: {saved_cfg.get(k)!r} -> {new_cfg.get(k)!r}"
            for k in sorted(set(saved_cfg) | set(new_cfg))
            if saved_cfg.get(k) != new_cfg.get(k)
        ]
        for k in ("model_path", "prompts_sha256", "sampling"):
            if saved.get(k) != identity[k]:
                diffs.append(f"{k} changed")
        if diffs:
            raise ConfigError(
                "--resume with settings that differ from the run being resumed ("
                + "; ".join(diffs)
                + "): use the same settings, or start a new run without --resume"
            )
        job.resume_from = last_checkpoint(run_dir)
        if job.resume_from is None:
            raise ConfigError(
                f"--resume: the run in '{run_dir}' saved no checkpoint yet; run without --resume"
            )


def start_run_dir(job: Job) -> None:
    run_dir = job.cfg.run_dir
    if not job.cfg.resume:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    from vbon.adapters import write_json_atomic

    write_json_atomic(
        run_dir / RUN_FILE,
        {"identity": run_identity(job), "config": job.cfg.to_dict(), "versions": versions()},
    )


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint that was saved completely (a kill during a save leaves a partial
    folder without the marker that JobCallback.on_save writes last)."""
    from trainer.callbacks import CHECKPOINT_COMPLETE

    ckpt = run_dir / CHECKPOINTS
    if not ckpt.is_dir():
        return None
    done = [
        p
        for p in ckpt.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / CHECKPOINT_COMPLETE).is_file()
    ]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))
