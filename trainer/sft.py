"""Our SFTTrainer: TRL's, with the loss computed on the completion positions only.

TRL's fused LM head exists to avoid materialising (tokens x vocab) logits on a GPU; without
Triton it projects every position whose label is set and folds each vocabulary tile in many
elementwise passes, and its metrics (entropy, token accuracy) cost more passes. Here only the
positions from the batch's first completion token on reach the LM head (`logits_to_keep`, the
models' own argument) and the loss is a plain float32 cross-entropy on them: the same loss and
gradient as TRL's up to rounding (tests/test_trainer_sft.py), and a BoN-SFT step of 32
examples on the embedded model went from ~11.8 s to ~7.5 s (docs/trainer.md).
"""

from __future__ import annotations

import torch


def completion_nll_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the labelled tokens (label != -100) and their count."""
    width = labels.size(1)
    # The first position labelled in any row; the logit at t predicts token t + 1.
    columns = (labels != -100).any(dim=0).nonzero()
    first = max(int(columns[0]), 1) if len(columns) else width - 1
    keep = width - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    targets = labels[:, first:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return nll, (targets != -100).sum()


def sft_trainer_class() -> type:
    """The SFTTrainer subclass of bon-sft and the warm start (imported lazily: TRL takes
    seconds)."""
    from trl import SFTTrainer

    class CompletionSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            nll, count = completion_nll_sum(
                model, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
            )
            # Trainer passes the token count of the whole (accumulated) batch, as TRL divides.
            denom = count if num_items_in_batch is None else num_items_in_batch
            loss = nll / torch.as_tensor(denom, device=nll.device).clamp(min=1)
            return (loss, None) if return_outputs else loss

    return CompletionSFTTrainer
