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
"""

from __future__ import annotations

from typing import Any

from trainer.logprobs import completion_logps_and_entropies


def rloo_trainer_class() -> type:
    """The RLOOTrainer subclass every RL job uses (imported lazily: TRL takes seconds)."""
    from trl import RLOOTrainer

    class VBoNRLOOTrainer(RLOOTrainer):
        rollouts: Any = None  # a trainer.rollouts.VLLMRollouts, set and started by the job

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

    return VBoNRLOOTrainer
