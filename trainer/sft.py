"""The SFT trainer of the bon-sft method and of vbon's warm start: TRL's SFTTrainer, with the loss
computed on the completion positions only, built on the datasets of trainer.sft_data.

TRL's fused LM head exists to avoid materialising (tokens x vocab) logits on a GPU; without
Triton it projects every position whose label is set and folds each vocabulary tile in many
elementwise passes, and its metrics (entropy, token accuracy) cost more passes. Here only the
completion positions reach the LM head (`logits_to_keep`, the models' own argument) and the loss
is a plain float32 cross-entropy on them: the same loss and gradient as TRL's up to rounding
(tests/test_trainer_sft.py), and a BoN-SFT step of 32 examples on the embedded model went from
~11.8 s to ~7.5 s (docs/trainer.md). The batch is laid out as the RL stage's (prompts left-padded,
completions after them), so the examples of one prompt in a batch share its forward
(trainer.logprobs.shared_prefix_logits; --sft-batches prompt-chunks, the default, keeps runs
of 4 of one prompt together, by-prompt all of them).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.jobspec import Job
from trainer.logprobs import completion_log_softmax
from trainer.policy import load_policy, lora_config, training_arguments
from trainer.reference import ReferenceRow
from trainer.run_folder import CHECKPOINTS
from trainer.sft_data import WARM_START_DATA, bon_sft_dataset

logger = logging.getLogger(__name__)


def completion_nll_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    base_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed negative log-likelihood of the labelled tokens (label != -100), each row's
    scaled by its entry of `weights` if given, their count and, with `base_context` (the LoRA
    adapter disabled), the summed exact KL(pi || pi_base) over the vocabulary at the same
    positions (gradient through pi only)."""
    ids, mask, targets = prompt_completion_layout(input_ids, attention_mask, labels)
    scored = targets.size(1)

    def log_softmax() -> torch.Tensor:
        return completion_log_softmax(model, ids, mask, scored, temperature=1.0)

    logp = log_softmax()
    labelled = targets != -100
    token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * labelled
    if weights is not None:
        token_logp = token_logp * weights.to(token_logp.dtype).unsqueeze(-1)
    nll = -token_logp.sum()
    kl = None
    if base_context is not None:
        with torch.no_grad(), base_context():
            base_logp = log_softmax()
        kl = ((logp.exp() * (logp - base_logp)).sum(-1) * labelled).sum()
    return nll, labelled.sum(), kl


def prompt_completion_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's batch (each row prompt + completion, right-padded; the completion is where the
    label is set) laid out as the RL batches are: prompts left-padded to one width, then the
    completions right-padded, and the completion targets (-100 on padding). Rows of one prompt
    then share their first columns, which trainer.logprobs computes once."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    spans = []
    for row in range(input_ids.size(0)):
        labelled = (labels[row] != -100).nonzero().flatten()
        length = int(attention_mask[row].sum())
        # A first token has no logit predicting it: it stays in the prompt, unscored.
        start = max(int(labelled[0]), 1) if len(labelled) else length
        spans.append((start, max(int(labelled[-1]) + 1, start) if len(labelled) else length))
    width = max(start for start, _ in spans)
    scored = max(max(end - start for start, end in spans), 1)
    ids = input_ids.new_zeros((input_ids.size(0), width + scored))
    mask = torch.zeros_like(ids)
    targets = labels.new_full((input_ids.size(0), scored), -100)
    for row, (start, end) in enumerate(spans):
        ids[row, width - start : width] = input_ids[row, :start]
        mask[row, width - start : width] = attention_mask[row, :start]
        ids[row, width : width + end - start] = input_ids[row, start:end]
        mask[row, width : width + end - start] = 1
        targets[row, : end - start] = labels[row, start:end]
    return ids, mask, targets


def sft_trainer_class() -> type:
    """The SFTTrainer subclass of bon-sft and the warm start (imported lazily: TRL takes
    seconds)."""
    from trl import SFTTrainer

    class CompletionSFTTrainer(SFTTrainer):
        kl_coef: float = 0.0  # --sft-kl-coef, set by the job

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            base = None
            if self.kl_coef > 0:
                base = self.accelerator.unwrap_model(model).disable_adapter
            nll, count, kl = completion_nll_sum(
                model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"], base,
                weights=inputs.get("weights"),
            )
            # Trainer passes the token count of the whole (accumulated) batch, as TRL divides.
            denom = count if num_items_in_batch is None else num_items_in_batch
            denom = torch.as_tensor(denom, device=nll.device).clamp(min=1)
            loss = nll / denom
            if kl is not None:
                loss = loss + self.kl_coef * kl / denom
                mode = "train" if model.training else "eval"  # TRL's metrics keys
                self._metrics[mode]["token_kl"].append((kl / count.clamp(min=1)).item())
            return (loss, None) if return_outputs else loss

    return CompletionSFTTrainer


def weighted_collator(inner: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """TRL's collator for examples that carry a per-example `weight` (--warm-start-loss
    advantage or bon-weighted): the weights travel beside the batch as `weights`."""

    def collate(examples: list[dict]) -> dict:
        batch = inner([{k: v for k, v in ex.items() if k != "weight"} for ex in examples])
        batch["weights"] = torch.tensor([float(ex["weight"]) for ex in examples])
        return batch

    return collate


def build_sft_trainer(
    job: Job,
    rows: list[ReferenceRow],
    *,
    progress: bool = True,
    epochs: float | None = None,
    output_dir: Path | None = None,
    save_checkpoints: bool = True,
    loss: str = "bon-sft",
) -> tuple[Any, Any]:
    """BoN-SFT: the bon-sft method, and the warm start of vbon (`epochs`, `output_dir`, and no
    checkpoints: --resume reuses only a finished warm start; `loss`: --warm-start-loss)."""
    from trl import SFTConfig

    from trainer.callbacks import JobCallback

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
        # by-prompt, prompt-chunks: the dataset's own order (sft_data._prompt_grouped_dataset).
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
