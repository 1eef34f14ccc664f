"""One sampler everywhere: the training rollouts (TRL's generation inside the job's RLOOTrainer)
and the vLLM path (reference samples, gateway, evaluation) must draw from the same
distribution for the same prompts. Compared on the base model: prompt tokens (exactly equal),
then reward, completion length and the base model's own per-token log-probability of the
samples (paired by prompt, z-tests), and the rewards' two-sample KS statistic. A control run
with transformers' usual top_k=50 must be caught."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.job import Job, build_rloo_trainer
from trainer.logprobs import completion_logprobs
from trainer.reference import close_llm
from vbon.prompts import default_prompt_file, load_prompts, render_task
from vbon.rewards import load_reward
from vbon.sampling import Sampling, vllm_params
from vbon.settings import CoreSettings

pytestmark = pytest.mark.engine

PROMPTS = 48
PER_PROMPT = 6
MAX_TOKENS = 24


def paired_z(a: np.ndarray, b: np.ndarray) -> float:
    """z of the mean per-prompt difference (rows: prompts, columns: samples)."""
    d = a.mean(axis=1) - b.mean(axis=1)
    se = d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() / se) if se > 0 else 0.0


def ks_statistic(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and its critical value at alpha = 0.001."""
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, "right") / len(a)
    cdf_b = np.searchsorted(b, grid, "right") / len(b)
    d = np.abs(cdf_a - cdf_b)
    crit = 1.949 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    return float(d.max()), crit


def statistics(job: Job, model, tok, openings, prompt_ids, completion_ids, texts):
    reward = job.reward
    r = np.array(
        [
            reward.score([o] * PER_PROMPT, texts[i * PER_PROMPT : (i + 1) * PER_PROMPT])
            for i, o in enumerate(openings)
        ]
    )
    lengths = np.array([len(c) for c in completion_ids], dtype=float).reshape(len(openings), -1)
    lp = completion_logprobs(
        model, prompt_ids, completion_ids, pad_id=tok.pad_token_id, disable_adapter=True
    )
    per_token = (np.array(lp) / np.maximum(lengths.ravel(), 1)).reshape(len(openings), -1)
    return r, lengths, per_token


def test_training_rollouts_match_vllm(embedded_model: Path, tmp_path: Path) -> None:
    from vbon.engine import build_llm

    openings = load_prompts(default_prompt_file("eval"))[:PROMPTS]
    sampling = Sampling(max_tokens=MAX_TOKENS)

    llm = build_llm(CoreSettings(), model_path=str(embedded_model))
    try:
        tok_v = llm.get_tokenizer()
        outs = llm.generate(
            [render_task(tok_v, o) for o in openings],
            vllm_params(sampling, n=PER_PROMPT),
            use_tqdm=False,
        )
    finally:
        close_llm(llm)
    v_prompt_ids = [list(o.prompt_token_ids) for o in outs for _ in o.outputs]
    v_comp_ids = [list(c.token_ids) for o in outs for c in o.outputs]
    v_texts = [c.text for o in outs for c in o.outputs]

    cfg = TrainConfig(
        max_tokens=MAX_TOKENS,
        completions_per_prompt=PER_PROMPT,
        evaluate=False,
        work_dir=str(tmp_path),
        output=str(tmp_path / "x"),
    )
    job = Job(
        cfg=cfg,
        model_path=str(embedded_model),
        sampling=sampling,
        openings=openings,
        reward=load_reward("vader"),
        engine_settings=None,
    )
    trainer, _ = build_rloo_trainer(job, None, progress=False)
    tok = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)

    def rollouts():
        prompts = [render_task(tok, o) for o in openings for _ in range(PER_PROMPT)]
        pids, cids, texts = [], [], []
        for start in range(0, len(prompts), 96):
            p, c, t = trainer._generate(prompts[start : start + 96])
            pids += p
            cids += c
            texts += t
        return pids, cids, texts

    t_prompt_ids, t_comp_ids, t_texts = rollouts()
    # The same prompt text becomes the same tokens on both paths (no BOS or template drift).
    assert t_prompt_ids == v_prompt_ids

    v = statistics(job, model, tok, openings, v_prompt_ids, v_comp_ids, v_texts)
    t = statistics(job, model, tok, openings, t_prompt_ids, t_comp_ids, t_texts)
    z = {
        name: paired_z(a, b) for name, a, b in zip(("reward", "length", "logp"), v, t, strict=True)
    }
    d, crit = ks_statistic(v[0], t[0])
    report = (
        f"z={z}, KS={d:.3f} (critical {crit:.3f}), means v={[x.mean() for x in v]} "
        f"t={[x.mean() for x in t]}"
    )
    assert all(abs(x) < 4.0 for x in z.values()), report
    assert d < crit, report

    # Control: transformers' common default top_k=50 on the training path must be detected.
    trainer.generation_config.top_k = 50
    trainer.generation_kwargs["top_k"] = 50
    c_prompt_ids, c_comp_ids, c_texts = rollouts()
    c = statistics(job, model, tok, openings, c_prompt_ids, c_comp_ids, c_texts)
    assert abs(paired_z(v[2], c[2])) >= 4.0, f"top_k=50 went unnoticed: {report}"
