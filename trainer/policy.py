"""The policy being trained: the base model and tokenizer in transformers, the layout of its
LoRA adapter (and the check that a given adapter fits it), and the TrainingArguments that every
training stage (RLOO, SFT) shares. torch, transformers and peft are imported where used: they
take seconds, and the job checks its inputs first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig
from vbon.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

    from trainer.jobspec import Job


def load_policy(job: Job) -> tuple[Any, Any]:
    """The base model (fp32 weights; autocast decides the compute dtype) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job.model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(job.model_path, dtype=torch.float32)
    return model, tok


def lora_config(cfg: TrainConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_warm_start_from(cfg: TrainConfig) -> None:
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

    return "bfloat16" if has_cuda() or has_native_bf16() else "float32"


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
        "use_cpu": not has_cuda(),
    }


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
