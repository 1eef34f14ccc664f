"""One sampler everywhere: the training rollouts (both --rollouts paths of the job's
RLOOTrainer: TRL's own generate, and the trainer's vLLM engine with the current LoRA) and the
vLLM path (reference samples, gateway, evaluation) must draw from the same distribution for
the same prompts. Compared on the base model: prompt tokens (exactly equal),
then reward, completion length and the base model's own per-token log-probability of the
samples (paired by prompt, z-tests), and the rewards' two-sample KS statistic. A control
must be caught: samples with transformers' usual top_k=50 default."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.jobspec import Job
from trainer.reference import ReferenceRow, cached_reference, close_llm, store_reference
from trainer.rloo import build_rloo_trainer
from vbon.logprobs import completion_logprobs
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


def _drawn(outs) -> tuple[list, list, list]:
    return (
        [list(o.prompt_token_ids) for o in outs for _ in o.outputs],
        [list(c.token_ids) for o in outs for c in o.outputs],
        [c.text for o in outs for c in o.outputs],
    )


@pytest.fixture(scope="module")
def vllm_samples(embedded_model: Path):
    """The gateway's path: one request with n per prompt, through vbon.engine; and the same
    with top_k=50 (the control), drawn on the same engine."""
    from vbon.engine import build_llm

    openings = load_prompts(default_prompt_file("eval"))[:PROMPTS]
    llm = build_llm(CoreSettings(), model_path=str(embedded_model))
    try:
        tok_v = llm.get_tokenizer()
        prompts = [render_task(tok_v, o) for o in openings]
        sampling = Sampling(max_tokens=MAX_TOKENS)
        outs = llm.generate(prompts, vllm_params(sampling, n=PER_PROMPT), use_tqdm=False)
        control = llm.generate(
            prompts, vllm_params(sampling.with_(top_k=50), n=PER_PROMPT), use_tqdm=False
        )
    finally:
        close_llm(llm)
    return openings, _drawn(outs), _drawn(control)


def training_rollouts(trainer, tok, openings):
    """The job's rollout path: TRL's _generate on the rendered prompts, as in training."""
    prompts = [render_task(tok, o) for o in openings for _ in range(PER_PROMPT)]
    pids, cids, texts = [], [], []
    for start in range(0, len(prompts), 96):
        p, c, t = trainer._generate(prompts[start : start + 96])
        pids += p
        cids += c
        texts += t
    return pids, cids, texts


def job_trainer(embedded_model: Path, tmp_path: Path, openings, rollouts: str):
    cfg = TrainConfig(
        max_tokens=MAX_TOKENS,
        completions_per_prompt=PER_PROMPT,
        evaluate=False,
        work_dir=str(tmp_path),
        output=str(tmp_path / "x"),
        rollouts=rollouts,
    )
    job = Job(
        cfg=cfg,
        model_path=str(embedded_model),
        sampling=Sampling(max_tokens=MAX_TOKENS),
        openings=openings,
        reward=load_reward("vader"),
        engine_settings=CoreSettings(),
    )
    trainer, _ = build_rloo_trainer(job, None, progress=False)
    return job, trainer


def compare(v, t) -> str:
    """Fails when the two sides' statistics (rewards, lengths, per-token log-probabilities)
    differ; returns the report."""
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
    return report


def test_transformers_rollouts_match_vllm(embedded_model: Path, tmp_path: Path, vllm_samples):
    openings, v_side, control = vllm_samples
    job, trainer = job_trainer(embedded_model, tmp_path, openings, "transformers")
    tok = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)

    t_side = training_rollouts(trainer, tok, openings)
    # The same prompt text becomes the same tokens on both paths (no BOS or template drift).
    assert t_side[0] == v_side[0]
    v = statistics(job, model, tok, openings, *v_side)
    report = compare(v, statistics(job, model, tok, openings, *t_side))

    # Control: the same statistics catch top_k=50 (transformers' common default), here in
    # samples drawn with it; a training path that let it slip in would fail the same way.
    c = statistics(job, model, tok, openings, *control)
    assert abs(paired_z(v[2], c[2])) >= 4.0, f"top_k=50 went unnoticed: {report}"


def test_vllm_rollouts_match_the_gateway_path(
    embedded_model: Path, tmp_path: Path, vllm_samples
) -> None:
    """--rollouts vllm (the default): the trainer's own engine, fed the untrained LoRA (B = 0)
    through TRL's rollout hook, samples what the gateway's path samples from the base model."""
    openings, v_side, _ = vllm_samples
    job, trainer = job_trainer(embedded_model, tmp_path, openings, "vllm")
    tok = trainer.processing_class
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.rollouts.start()
    try:
        t_side = training_rollouts(trainer, tok, openings)
        assert trainer.rollouts.synced_step == 0 and trainer.rollouts.lora is not None
    finally:
        trainer.rollouts.close()
    assert not trainer.rollouts.folder.exists()
    assert t_side[0] == v_side[0]
    v = statistics(job, model, tok, openings, *v_side)
    compare(v, statistics(job, model, tok, openings, *t_side))


def test_evaluation_scores_a_real_adapter(
    embedded_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """trainer.evaluate on the real engine: base and BoN from the same base samples, the
    adapter through its LoRARequest, its KL from fp32 log-probabilities, progress shown; the
    base samples go into the cache, and a second evaluation takes them from there."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.evaluate import evaluate_adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    # Random A and B (peft's default leaves B at zero): an adapter far from the base model.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    openings = load_prompts(default_prompt_file("eval"))[:3]
    reward, sampling = load_reward("vader"), Sampling(max_tokens=8)

    def evaluate(seed: int = 0) -> dict:
        return evaluate_adapter(
            tmp_path / "adapter",
            model_path=str(embedded_model),
            reward=reward,
            openings=openings,
            n=2,
            samples=2,
            sampling=sampling,
            engine_settings=CoreSettings(model=str(embedded_model)),
            lora_rank=4,
            seed=seed,
            cache_dir=tmp_path / "cache",
        )

    metrics = evaluate()
    assert metrics["eval_prompts"] == 3 and metrics["eval_samples_per_prompt"] == 2
    # BoN-2 is the best of each pair of the same base samples whose mean is the base reward.
    assert metrics["reward_bon2"] >= metrics["reward_base"]
    # KL(pi || pi_base) > 0 for an adapter this far off (sampled from the adapter in vLLM,
    # scored by peft): a wrong adapter on either side would show no drift.
    assert metrics["kl_to_base"] > 1.0
    err = capfd.readouterr().err
    assert "evaluation: base model (4 per prompt)" in err
    assert "evaluation: adapter (2 per prompt)" in err
    assert metrics["eval_base_samples_cached"] is False

    # The base samples, scored, in the trainer's cache under the key of these prompts, N x
    # samples, the sampling and the reward.
    rows, path, _ = cached_reference(tmp_path / "cache", str(embedded_model), openings, 4,
                                     sampling, reward)  # fmt: skip
    assert rows is not None and [r.prompt for r in rows] == openings
    for row in rows:
        assert len(row.responses) == 4
        assert row.rewards == pytest.approx(reward.score([row.prompt] * 4, row.responses))
    assert float(np.mean([np.mean(r.rewards) for r in rows])) == pytest.approx(
        metrics["reward_base"], abs=1e-4
    )
    # Read back, not drawn again: rewards put into the cache are the ones summarised.
    made_up = [ReferenceRow(r.prompt, r.responses, [-1.0, 1.0, -1.0, 0.5]) for r in rows]
    store_reference(path, json.loads(path.with_suffix(".key.json").read_text()), made_up)
    again = evaluate()
    assert again["eval_base_samples_cached"] is True
    assert again["reward_base"] == pytest.approx(-0.125) and again["reward_bon2"] == 0.75
    err = capfd.readouterr().err
    assert "evaluation: base model" not in err and "evaluation: adapter (2 per prompt)" in err
    # The seed drives the engine: another seed is a new draw of the adapter's samples (its KL
    # estimate, a mean over those samples, moves), on the same cached base samples.
    other = evaluate(seed=1)
    assert other["eval_seed"] == 1 and other["eval_base_samples_cached"] is True
    assert other["reward_base"] == again["reward_base"]
    assert other["kl_to_base"] != again["kl_to_base"]
