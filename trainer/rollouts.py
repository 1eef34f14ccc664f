"""Training rollouts from a vLLM engine instead of transformers' `generate`.

Why: vLLM is the sampler the gateway serves with, so the policy is trained on the samples it
will be served as, and on this CPU it draws them ~1.8x faster than `generate` (which took about
a quarter of every RLOO step; docs/trainer.md has the breakdown).
How: TRL asks `_generate_single_turn` for completion token ids; our RLOOTrainer
(trainer/rloo.py) answers from an offline vLLM engine (built once by `vbon.engine.build_llm`),
with the current LoRA weights saved after each optimizer step and loaded under a new LoRA id
(vLLM never reloads weights in place under the same id). Log-probabilities for the loss still
come from the training model, as with TRL's own vLLM mode.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from vbon.sampling import Sampling, vllm_params

logger = logging.getLogger(__name__)


class VLLMRollouts:
    """An offline vLLM engine that samples completions from the current LoRA policy."""

    def __init__(
        self,
        *,
        model_path: str,
        engine_settings: Any,
        sampling: Sampling,
        lora_rank: int,
        folder: Path,
        seed: int = 0,
    ) -> None:
        self.model_path = model_path
        self.engine_settings = engine_settings
        self.sampling = sampling
        self.lora_rank = lora_rank
        self.folder = folder
        self.seed = seed
        self.llm: Any = None
        self.lora: Any = None
        self.synced_step: int | None = None
        self.seconds = {"sync": 0.0, "generate": 0.0}

    def start(self) -> None:
        """Start the engine (a setup step: tens of seconds, so never in __init__)."""
        from trainer.reference import build_lora_llm

        t0 = time.monotonic()
        # The job's seed, not the gateway's engine seed, drives the rollouts' sampling.
        self.llm = build_lora_llm(
            self.engine_settings, self.model_path, self.lora_rank, max_loras=1, seed=self.seed
        )
        logger.info("rollout engine ready in %.0f s", time.monotonic() - t0)

    def close(self) -> None:
        from trainer.reference import close_llm

        if self.llm is not None:
            close_llm(self.llm)
            self.llm = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def sync(self, model: Any, step: int) -> None:
        """Publish the policy's current LoRA weights to the engine as a new LoRA id."""
        from vllm.lora.request import LoRARequest

        t0 = time.monotonic()
        path = self.folder / f"step-{step}"
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(str(path))
        old = self.lora
        # ids start at 1; a resumed run starts past its checkpoint's step, so ids stay unique.
        self.lora = LoRARequest(f"policy-step-{step}", step + 1, str(path.resolve()))
        self.synced_step = step
        if old is not None:
            # The engine has the old adapter's weights in memory; its folder is not needed.
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.seconds["sync"] += time.monotonic() - t0

    def generate(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Completion token ids, one list per prompt, in order. Consecutive repeats of the same
        prompt (TRL's RepeatSampler gives each prompt `num_generations` times in a row) become
        one request with n = repeats, so the prompt is prefilled once, as in BoN."""
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("VLLMRollouts.start() was not called")
        t0 = time.monotonic()
        groups: list[tuple[list[int], int]] = []
        for ids in prompt_ids:
            if groups and groups[-1][0] == ids:
                groups[-1] = (ids, groups[-1][1] + 1)
            else:
                groups.append((list(ids), 1))
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in groups]
        params = [vllm_params(self.sampling, n=n) for _, n in groups]
        outs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        completions: list[list[int]] = []
        for out, (_, n) in zip(outs, groups, strict=True):
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples, expected {n}")
            completions.extend(list(c.token_ids) for c in out.outputs)
        self.seconds["generate"] += time.monotonic() - t0
        return completions
