"""The RL stage's trainer (vbon and kl-rl): its dataset, and TRL's RLOOTrainer with these
changes (1 and 2 make a step on this CPU shorter).

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
4. With `--credit critic` (`critic` set, trainer/critic.py), each token gets its own advantage,
   A - (V(s_t) - V(s_0)), V a critic of the base model's hidden states fitted on the reference
   samples: one no-grad forward of the base per step (hidden states only, no LM head), and the
   loss sums A_t log pi(y_t) over tokens (on-policy, as 3.). The KL penalty stays as chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.critic import Critic, token_advantages
from trainer.jobspec import Job
from trainer.logprobs import completion_logps_and_entropies, completion_logps_and_token_kl
from trainer.policy import load_policy, lora_config, training_arguments
from trainer.reference import ReferenceRow
from trainer.run_folder import CHECKPOINTS
from vbon.logprobs import completion_logprobs

if TYPE_CHECKING:
    from datasets import Dataset


def rloo_trainer_class() -> type:
    """The RLOOTrainer subclass every RL job uses (imported lazily: TRL takes seconds)."""
    from trl import RLOOTrainer

    class VBoNRLOOTrainer(RLOOTrainer):
        rollouts: Any = None  # a trainer.rollouts.VLLMRollouts, set and started by the job
        token_kl_beta: float | None = None  # --kl-penalty token: KL weight (TRL's beta is 0)
        critic: Critic | None = None  # --credit critic
        _skip_old_logps = False

        @property
        def _own_loss(self) -> bool:
            return self.token_kl_beta is not None or self.critic is not None

        def _generate_and_score_completions(self, inputs):
            if self._own_loss and (
                self.args.num_iterations != 1 or self.args.steps_per_generation != 1
            ):
                raise ValueError(
                    "the token KL penalty and the critic are on-policy only: set "
                    "num_iterations=1 and steps_per_generation=1"
                )
            # The token KL replaces TRL's sequence penalty, which reads the "old" forward; with
            # the sequence penalty (and the critic alone) that forward stays.
            self._skip_old_logps = self.token_kl_beta is not None
            try:
                out = super()._generate_and_score_completions(inputs)
            finally:
                self._skip_old_logps = False
            if self.critic is not None:
                ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
                mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
                hidden = self.base_hidden_states(ids, mask)
                out["values"] = self.critic.values(
                    hidden, out["prompt_ids"].size(1) - 1, out["completion_ids"].size(1)
                )
            return out

        @torch.no_grad()
        def base_hidden_states(self, input_ids, attention_mask):
            """The base model's hidden states (adapter off), under the step's autocast; the
            LM head runs on one position only (the critic needs no logits)."""
            unwrapped = self.accelerator.unwrap_model(self.model)
            device = next(unwrapped.parameters()).device
            with unwrapped.disable_adapter(), self.accelerator.autocast():
                out = unwrapped(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
            return out.hidden_states

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
            if not self._own_loss:
                return super()._compute_loss(model, inputs)
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
            mode = "train" if self.model.training else "eval"
            if self.token_kl_beta is not None:
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
            else:
                token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, completion_ids.size(1),
                    compute_entropy=True,
                )
            mask = completion_mask.to(token_logps.dtype)
            advantages = inputs["advantages"]
            if self.critic is not None:
                per_token = token_advantages(advantages, inputs["values"], mask)
                # On-policy, TRL's clipped ratio is 1 with gradient grad(log pi): the loss is
                # the policy gradient, each token with its own advantage.
                loss = -(per_token * token_logps).sum(1).mean()
                # How much of the advantage's variance over tokens the critic takes away.
                sequence = advantages.unsqueeze(1).expand_as(per_token)[mask.bool()]
                left = per_token[mask.bool()]
                self._metrics[mode]["critic_var_ratio"].append(
                    (left.var() / sequence.var().clamp(min=1e-12)).item()
                )
            else:
                # On-policy TRL's ratio exp(logps - old_logps) is 1 with gradient grad(logps).
                loss = -(advantages * (token_logps * mask).sum(1)).mean()
            stats = [(entropies * mask).sum(), mask.sum()]
            if self.token_kl_beta is not None:
                loss = loss + self.token_kl_beta * (token_kl * mask).sum(1).mean()
                # Logged (and read by the KL early stop) as TRL logs it: the sampled-token
                # estimate, which bf16 autocast leaves unbiased (completion_logps_and_token_kl).
                stats.append(((token_logps.detach() - base_logps) * mask).sum())
            reduced = self.accelerator.reduce(torch.stack(stats), reduction="sum")
            tokens = reduced[1].clamp(min=1.0)
            self._metrics[mode]["entropy"].append((reduced[0] / tokens).item())
            if self.token_kl_beta is not None:
                self._metrics[mode]["kl"].append((reduced[2] / tokens).item())
            return loss

    return VBoNRLOOTrainer


def rl_dataset(job: Job, tok: Any, rows: list[ReferenceRow] | None) -> Dataset:
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


def build_rloo_trainer(
    job: Job,
    rows: list[ReferenceRow] | None,
    *,
    progress: bool = True,
    init_adapter: Path | None = None,
) -> tuple[Any, Any]:
    """The RLOOTrainer of this job (also used by the sampler-consistency test); a fresh LoRA
    adapter, or `init_adapter`'s weights (the warm start) trained further."""
    from trl import RLOOConfig

    from trainer.callbacks import JobCallback
    from trainer.rewards import RewardFunction, VBoNReward

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
