"""The training job, top to bottom: check inputs -> reference statistics -> train -> evaluate
-> publish. One function per stage; `main` runs them in order. What the stages call lives beside
it: trainer.jobspec (the Job they share), trainer.run_folder (the run folder and --resume),
trainer.policy (model, LoRA, training arguments), trainer.sft and trainer.sft_data (BoN-SFT: the
bon-sft method and vbon's warm start), trainer.rloo (the RL stage), trainer.rewards (the RL
reward: vBoN's log F-hat(r(y)) from the reference statistics, or KL-RL's raw reward),
trainer.critic, trainer.reference, trainer.evaluate and trainer.provenance (what vbon.json
records).

    python -m trainer --n 8                     # vBoN-8 on the defaults
    python -m trainer --method kl-rl --beta 0.1 # baseline: KL-regularised RL on the raw reward
    python -m trainer --method bon-sft --n 8    # baseline: SFT on the best of 8 samples
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig, parse_config
from trainer.jobspec import Job, engine_settings_for
from trainer.policy import check_warm_start_from
from trainer.provenance import portable_model_name, prompts_sha256, recipe_record, versions
from trainer.reference import ReferenceRow
from trainer.run_folder import WARM_START, check_run_dir, check_writable, start_run_dir
from trainer.sft_data import WARM_START_DATA, sample_token_ids
from vbon.errors import ConfigError
from vbon.sampling import Sampling

if TYPE_CHECKING:  # torch loads in seconds; the job imports it where it trains
    from trainer.critic import Critic

logger = logging.getLogger("trainer")


# --- stage 1: check everything that can be checked fast -------------------------------------


def prepare(cfg: TrainConfig) -> Job:
    """Fail with a clear ConfigError before any long work; write nothing on failure."""
    from vbon.models import resolve_model
    from vbon.prompts import default_prompt_file, load_prompts
    from vbon.rewards import load_reward

    out = cfg.output_dir
    if out.exists() and not cfg.overwrite:
        raise ConfigError(
            f"output folder '{out}' exists: pass --overwrite to replace it when the new "
            "adapter is complete, or choose another --output"
        )
    check_writable(out.parent, "output folder")
    check_writable(cfg.run_dir, "work folder (--work-dir)")
    model_path = resolve_model(cfg.model)
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(model_path)
        AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:
        raise ConfigError(f"base model '{cfg.model}' does not load ({exc})") from exc

    rows = None
    if cfg.reference_from:
        rows = _read_reference(cfg)
        openings = [r.prompt for r in rows]
        source = f"file:{cfg.reference_from}"
        if cfg.method == "kl-rl":  # only its prompts are used
            rows, source = None, f"prompts of {cfg.reference_from}"
    else:
        openings = load_prompts(cfg.prompts or default_prompt_file("train"))
        if cfg.num_prompts:
            openings = openings[: cfg.num_prompts]
        source = "vllm"
    if len(openings) < cfg.prompts_per_step and cfg.method != "bon-sft":
        raise ConfigError(
            f"{len(openings)} training prompt(s) but --prompts-per-step {cfg.prompts_per_step}: "
            "give more prompts or lower --prompts-per-step"
        )
    rl_prompts = _rl_prompts(cfg, len(openings))
    if cfg.warm_start_from:
        check_warm_start_from(cfg)
    reward = load_reward(cfg.reward)
    eval_openings: list[str] = []
    if cfg.evaluate:
        eval_openings = load_prompts(cfg.eval_prompts or default_prompt_file("eval"))
        if cfg.eval_num_prompts:
            eval_openings = eval_openings[: cfg.eval_num_prompts]
    job = Job(
        cfg=cfg,
        model_path=model_path,
        sampling=Sampling(max_tokens=cfg.max_tokens),
        openings=openings,
        reward=reward,
        engine_settings=engine_settings_for(model_path),
        eval_openings=eval_openings,
        reference_rows=rows,
        reference_source=source,
        rl_prompts=rl_prompts,
    )
    check_run_dir(job)
    return job


def _rl_prompts(cfg: TrainConfig, prompts: int) -> int:
    """--rl-prompts resolved against the number of training prompts."""
    from trainer.config import VBON_RL_PROMPTS

    if cfg.rl_prompts is None:
        if cfg.method != "vbon" or not cfg.warm_start_epochs:
            return 0
        k = min(VBON_RL_PROMPTS, prompts // 4)
        return k if k >= cfg.prompts_per_step else 0
    if cfg.rl_prompts and not cfg.prompts_per_step <= cfg.rl_prompts < prompts:
        raise ConfigError(
            f"--rl-prompts {cfg.rl_prompts} with {prompts} training prompts: it must be at "
            f"least --prompts-per-step ({cfg.prompts_per_step}) and leave the warm start at "
            "least one prompt; change --rl-prompts (0: both stages use every prompt)"
        )
    return cfg.rl_prompts



def _read_reference(cfg: TrainConfig) -> list[ReferenceRow]:
    from trainer.reference import read_reference_file

    need = cfg.n if cfg.method != "kl-rl" else 1
    rows = read_reference_file(Path(cfg.reference_from), min_samples=need)
    if cfg.num_prompts:
        rows = rows[: cfg.num_prompts]
    if cfg.method == "bon-sft" and any(not r.responses for r in rows):
        raise ConfigError("--method bon-sft needs the \"responses\" in --reference-from rows")
    return rows



# --- stage 2: reference statistics ---------------------------------------------------------


def reference_stage(job: Job) -> list[ReferenceRow]:
    if job.reference_rows is not None:
        return job.reference_rows
    from trainer.reference import load_or_compute_reference

    rows, path = load_or_compute_reference(
        cache_dir=Path(job.cfg.work_dir) / "cache",
        model_path=job.model_path,
        openings=job.openings,
        m=job.cfg.m,
        sampling=job.sampling,
        reward=job.reward,
        engine_settings=job.engine_settings,
        seed=job.cfg.seed,
    )
    job.reference_source = f"vllm:{path}"
    return rows


# --- stage 3: training -----------------------------------------------------------------------


def warm_start_stage(job: Job, rows: list[ReferenceRow]) -> Path:
    """--warm-start-epochs: BoN-SFT toward BoN-N's samples, where the RL stage starts.

    The adapter is kept in the run folder (written atomically), so --resume does not train it
    again; a fresh run (no --resume) trains it anew."""
    from trainer.sft import build_sft_trainer
    from vbon.adapters import staged_folder

    cfg = job.cfg
    if cfg.warm_start_from:
        logger.info("warm start: taken from %s", cfg.warm_start_from)
        return Path(cfg.warm_start_from)
    folder = cfg.run_dir / WARM_START
    if cfg.resume and (folder / "adapter_config.json").is_file():
        logger.info("warm start: reusing %s", folder)
        return folder
    what = WARM_START_DATA[cfg.warm_start_loss][1].format(n=cfg.n)
    logger.info("warm start: %.3g epochs of %s on %d prompts (%d left for RL)",
                cfg.warm_start_epochs, what, len(rows), job.rl_prompts)
    scratch = cfg.run_dir / f"{WARM_START}-checkpoints"
    trainer, _ = build_sft_trainer(
        job, rows, epochs=cfg.warm_start_epochs, output_dir=scratch, save_checkpoints=False,
        loss=cfg.warm_start_loss,
    )
    _drop_default_progress(trainer)
    trainer.train()
    with staged_folder(folder, overwrite=True) as tmp:
        trainer.model.save_pretrained(str(tmp))
    shutil.rmtree(scratch, ignore_errors=True)
    return folder


def critic_stage(job: Job, trainer: Any, rows: list[ReferenceRow]) -> Critic:
    """--credit critic: the critic fitted on the last --critic-prompts prompts' reference
    samples, through the RL trainer's own base forward (trainer/critic.py). Kept in the run
    folder (written atomically), so --resume does not fit it again."""
    from trainer.critic import CRITIC_FILE, Critic, fit_critic
    from vbon.prompts import render_task

    cfg = job.cfg
    path = cfg.run_dir / CRITIC_FILE
    if cfg.resume and path.is_file():
        critic = Critic.load(path)
        logger.info("critic: reusing %s (held-out R^2 %.3f)", path, critic.r2_heldout)
        return critic
    tok = trainer.processing_class
    groups = []
    for row in rows[-cfg.critic_prompts :]:
        prompt = render_task(tok, row.prompt)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        completions = [
            sample_token_ids(tok, prompt, prompt_ids, text, job.sampling.max_tokens)
            for text in row.responses
        ]
        groups.append((prompt_ids, completions, list(row.rewards)))
    logger.info("critic: fitting on %d prompts x %d reference samples", len(groups),
                len(rows[0].responses) if rows else 0)
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            logger.info("critic: %d/%d prompts (%.0f s)", done, total,
                        time.monotonic() - started)

    base_config = trainer.accelerator.unwrap_model(trainer.model).get_base_model().config
    critic = fit_critic(
        trainer.base_hidden_states, base_config, groups,
        pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, progress=progress,
    )
    critic.save(path)
    return critic


def train_stage(job: Job, rows: list[ReferenceRow] | None) -> tuple[Any, Any]:
    """bon-sft: BoN-SFT; vbon: its warm start (if any), then RL; kl-rl: RL. All stages share
    one --max-train-minutes deadline and the seed. Returns the last trainer and its callback."""
    from transformers import set_seed

    from trainer.rloo import build_rloo_trainer
    from trainer.sft import build_sft_trainer

    if job.cfg.max_train_minutes:
        job.train_deadline = time.monotonic() + job.cfg.max_train_minutes * 60.0
    set_seed(job.cfg.seed)
    if job.cfg.method == "bon-sft":
        assert rows is not None
        trainer, callback = build_sft_trainer(job, rows)
    else:
        init = None
        fit_rows = rows  # the critic's (--credit critic): the warm start's prompts, if any
        if job.cfg.warm_start_epochs > 0:
            assert rows is not None
            k = job.rl_prompts
            fit_rows = rows[:-k] if k else rows
            init = warm_start_stage(job, fit_rows)
            rows = rows[-k:] if k else rows
            set_seed(job.cfg.seed)
        trainer, callback = build_rloo_trainer(job, rows, init_adapter=init)
        if job.cfg.credit == "critic":
            assert fit_rows is not None
            trainer.critic = critic_stage(job, trainer, fit_rows)
    _drop_default_progress(trainer)
    rollouts = getattr(trainer, "rollouts", None)
    if rollouts is not None:
        rollouts.start()
    try:
        trainer.train(resume_from_checkpoint=job.resume_from)
    finally:
        if rollouts is not None:
            # Its engine process would compete with the evaluation's for the CPU.
            rollouts.close()
            logger.info("rollouts: %s", {k: round(v, 1) for k, v in rollouts.seconds.items()})
    return trainer, callback


def _drop_default_progress(trainer: Any) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)


# --- stage 4/5: evaluate and publish ---------------------------------------------------------


def publish_stage(job: Job, trainer: Any, callback: Any, rows: list[ReferenceRow] | None) -> Path:
    from trainer.curves import write_curves
    from vbon.adapters import AdapterMeta, staged_folder, validate_adapter, write_json_atomic
    from vbon.base_weights import weights_sha256

    cfg = job.cfg
    out = cfg.output_dir
    with staged_folder(out, overwrite=cfg.overwrite) as tmp:
        trainer.model.save_pretrained(str(tmp))
        curve_rows = write_curves(trainer.state.log_history, tmp)
        metrics: dict[str, Any] = {"train_steps": trainer.state.global_step}
        if callback.stop_reason:
            metrics["stopped_early"] = callback.stop_reason
        if getattr(trainer, "critic", None) is not None:
            metrics["critic_r2_heldout"] = round(trainer.critic.r2_heldout, 4)
        last = curve_rows[-min(len(curve_rows), cfg.kl_window) :] if curve_rows else []
        for key in ("reward", "log_fhat", "kl_seq"):
            vals = [float(r[key]) for r in last if r.get(key) not in ("", None)]
            if vals:
                metrics[f"train_{key}_last{len(vals)}"] = round(sum(vals) / len(vals), 4)
        if curve_rows and curve_rows[-1].get("elapsed_s") not in ("", None):
            metrics["train_seconds"] = curve_rows[-1]["elapsed_s"]
        meta = AdapterMeta(
            name=out.name,
            method=cfg.method,
            objective=cfg.objective if cfg.method == "vbon" else None,
            n=cfg.n if cfg.method != "kl-rl" else None,
            beta=cfg.kl_weight if cfg.method != "bon-sft" else None,
            m=(min(len(r.rewards) for r in rows) if rows else None),
            base_model=portable_model_name(job.model_path),
            base_weights_sha256=weights_sha256(job.model_path),
            reward=cfg.reward,
            prompts_sha256=prompts_sha256(job.openings),
            steps=trainer.state.global_step,
            seed=cfg.seed,
            lora_rank=cfg.lora_rank,
            sampling=job.sampling.to_dict(),
            metrics=metrics,
            versions=versions(),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            recipe=recipe_record(cfg, job.argv),
        )
        write_json_atomic(tmp / "vbon.json", meta.model_dump(mode="json"))
        resolved = {**cfg.to_dict(), "rl_prompts": job.rl_prompts}
        write_json_atomic(tmp / "train_config.json", resolved)
        if cfg.evaluate:
            metrics.update(_evaluate(job, tmp))
            meta.metrics = metrics
            write_json_atomic(tmp / "vbon.json", meta.model_dump(mode="json"))
        validate_adapter(tmp)
    return out


def _evaluate(job: Job, folder: Path) -> dict[str, Any]:
    from trainer.evaluate import evaluate_adapter

    logger.info("evaluating on %d held-out prompts", len(job.eval_openings))
    try:
        metrics = evaluate_adapter(
            folder,
            model_path=job.model_path,
            reward=job.reward,
            openings=job.eval_openings,
            n=job.cfg.n if job.cfg.method != "kl-rl" else 8,
            samples=job.cfg.eval_samples,
            sampling=job.sampling,
            engine_settings=job.engine_settings,
            lora_rank=job.cfg.lora_rank,
            seed=job.cfg.seed,
            cache_dir=Path(job.cfg.work_dir) / "cache",
        )
    except Exception as exc:  # the trained adapter is worth publishing without its metrics
        logger.exception("evaluation failed; publishing without evaluation metrics")
        return {"evaluation_error": f"{type(exc).__name__}: {exc}"}
    logger.info("evaluation: %s", json.dumps(metrics))
    return metrics


# --- the job ---------------------------------------------------------------------------------


def run(job: Job) -> Path:
    t0 = time.monotonic()
    cfg = job.cfg
    logger.info("config: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    logger.info("base model %s; %d training prompts; sampling %s", job.model_path,
                len(job.openings), job.sampling.to_dict())
    start_run_dir(job)
    rows = reference_stage(job) if cfg.method in ("vbon", "bon-sft") else None
    logger.info("reference stage done at %.0f s (%s)", time.monotonic() - t0, job.reference_source)
    trainer, callback = train_stage(job, rows)
    logger.info("training done at %.0f s (%d steps)", time.monotonic() - t0,
                trainer.state.global_step)
    out = publish_stage(job, trainer, callback, rows)
    logger.info("published %s at %.0f s", out, time.monotonic() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        cfg = parse_config(argv)
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        job = prepare(cfg)
        job.argv = argv
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from safetensors import SafetensorError  # raised (as "os error 27" ...) by weight writes

    try:
        out = run(job)
    except (OSError, SafetensorError) as exc:
        # Disk full, quota, a folder made read-only mid-run: outputs are staged, so nothing
        # half-written is visible and a previous adapter stays as it was.
        logger.exception("writing failed")
        print(
            f"error: writing failed ({exc}); no partial adapter was published and "
            f"'{job.cfg.output_dir}' is unchanged. Free space or fix permissions, then rerun "
            "with --resume to continue from the last checkpoint.",
            file=sys.stderr,
        )
        return 1
    print(out)
    return 0
