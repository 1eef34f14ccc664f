"""Our RLOOTrainer: TRL's, with two changes that make a step on this CPU shorter.

1. Rollouts from a vLLM engine when the job sets `trainer.rollouts` (trainer/rollouts.py):
   the serving sampler, current LoRA each step.
2. Per-token log-probabilities with plain logits on the CPU. TRL's fused LM head exists to avoid
   materialising (tokens x vocab) logits on a GPU; without Triton it scores every position of
   prompt and completion (tokens whose label is -100 included) and folds each vocabulary tile
   with a dozen elementwise passes, forward and backward. With 32 completions of 32 tokens after
   ~45 prompt tokens that was ~2.4x the positions needed and about a third of the step
   (docs/trainer.md). Here only the completion positions go through the LM head
   (`logits_to_keep`, the models' own argument), once, and log-softmax runs on those logits in
   fp32 (trainer.logprobs.completion_logps_and_entropies). Same values and gradients as TRL's
   path up to rounding (tests/test_trainer_rloo.py); a step went from 28.9 s to ~20 s.
3. With `--kl-penalty token` (`token_kl_beta` set), the KL to the base enters the loss as the
   exact per-position KL over the whole vocabulary, beta * sum_t KL(pi(.|y<t) || pi_base(.|y<t)),
   instead of TRL's beta * sum_t log(pi(y_t)/pi_base(y_t)) subtracted from each sequence's reward.
   Both estimate the same sequence KL (the token form without bias in fp32 only; bf16
   autocast makes it come out low). The token form does not depend on which token was
   sampled, so its gradient pulls every visited next-token distribution back to the base at
   every step, where the reward form pulls back only along the sampled tokens, through the
   same noisy advantages as the reward. One step per generation keeps it on-policy, so the
   "old" log-probabilities TRL computes in a separate forward equal the loss forward's
   detached ones: that forward is skipped. Experimental, off by default (docs/trainer.md).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.logprobs import completion_logps_and_entropies, completion_logps_and_token_kl


def rloo_trainer_class() -> type:
    """The RLOOTrainer subclass every RL job uses (imported lazily: TRL takes seconds)."""
    from trl import RLOOTrainer

    class VBoNRLOOTrainer(RLOOTrainer):
        rollouts: Any = None  # a trainer.rollouts.VLLMRollouts, set and started by the job
        token_kl_beta: float | None = None  # --kl-penalty token: KL weight (TRL's beta is 0)
        _skip_old_logps = False

        def _generate_and_score_completions(self, inputs):
            if self.token_kl_beta is not None and (
                self.args.num_iterations != 1 or self.args.steps_per_generation != 1
            ):
                raise ValueError(
                    "the token KL penalty is on-policy only: set num_iterations=1 and "
                    "steps_per_generation=1"
                )
            self._skip_old_logps = self.token_kl_beta is not None
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self._skip_old_logps = False

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            if self.rollouts is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
            step = self.state.global_step
            if self.rollouts.synced_step != step:
                self.rollouts.sync(self.accelerator.unwrap_model(self.model), step)
            return self.rollouts.generate(prompt_ids)

        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            compute_aux_loss=False,
            **multimodal,
        ):
            if self._skip_old_logps and not torch.is_grad_enabled():
                # The "old" log-probabilities (see 3. above); the loss does not read them.
                zeros = torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device)
                return zeros, None, None
            # TRL's fused head is the better choice on GPUs (memory) and the only one for
            # vision inputs and MoE auxiliary losses; text on the CPU takes the plain path.
            if (
                input_ids.device.type != "cpu"
                or compute_aux_loss
                or any(v is not None for v in multimodal.values())
            ):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size,
                    compute_entropy, compute_aux_loss, **multimodal,
                )
            with self.accelerator.autocast():
                logps, entropies = completion_logps_and_entropies(
                    model,
                    input_ids,
                    attention_mask,
                    logits_to_keep,
                    temperature=self.temperature,
                    compute_entropy=compute_entropy,
                    batch_size=batch_size or input_ids.size(0),
                )
            return logps, entropies, None

        def _compute_loss(self, model, inputs):
            if self.token_kl_beta is None:
                return super()._compute_loss(model, inputs)
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
            unwrapped = self.accelerator.unwrap_model(model)
            with self.accelerator.autocast():
                token_logps, token_kl, base_logps, entropies = completion_logps_and_token_kl(
                    model,
                    input_ids,
                    attention_mask,
                    completion_ids.size(1),
                    base_context=unwrapped.disable_adapter,
                    temperature=self.temperature,
                    batch_size=input_ids.size(0),
                )
            mask = completion_mask.to(token_logps.dtype)
            logps = (token_logps * mask).sum(1)
            sequence_kl = (token_kl * mask).sum(1)
            # On-policy TRL's clipped ratio exp(logps - old_logps) is 1 with gradient grad(logps).
            loss = -(inputs["advantages"] * logps).mean() + self.token_kl_beta * sequence_kl.mean()

            # Logged (and read by the KL early stop) as TRL logs it: the sampled-token estimate,
            # which bf16 autocast leaves unbiased (see completion_logps_and_token_kl).
            sampled_kl = (token_logps.detach() - base_logps) * mask
            mode = "train" if self.model.training else "eval"
            stats = self.accelerator.reduce(
                torch.stack([sampled_kl.sum(), (entropies * mask).sum(), mask.sum()]),
                reduction="sum",
            )
            tokens = stats[2].clamp(min=1.0)
            self._metrics[mode]["kl"].append((stats[0] / tokens).item())
            self._metrics[mode]["entropy"].append((stats[1] / tokens).item())
            return loss

    return VBoNRLOOTrainer
