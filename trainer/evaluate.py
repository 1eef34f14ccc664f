"""Held-out evaluation of an adapter against the base model and BoN-N, on one vLLM engine.

Per held-out prompt: the base model draws `samples` groups of N (base reward = mean of all;
BoN-N = best of each group), the adapter draws `samples` completions (LoRARequest); all under
vbon.sampling's settings and the gateway's prompt formatting. KL(pi || pi_base) is estimated
from the adapter's samples as sum_t log pi(y_t) - log pi_base(y_t) with transformers in fp32
(adapter on / off): the adapter's draw and its KL are vbon.evaluation's (sample_adapter,
adapter_kl), the same as `python -m vbon.evaluation`'s. The metrics are
vbon.metrics.summarise's: standard errors across prompts (prompt means), the gain fraction's
by bootstrap over prompts.

    python -m trainer.evaluate adapters/vbon-n8 [--write] [--cache-dir runs/cache]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vbon.errors import ConfigError
from vbon.metrics import summarise
from vbon.sampling import Sampling

logger = logging.getLogger(__name__)


def evaluate_adapter(
    adapter_dir: Path,
    *,
    model_path: str,
    reward: Any,
    openings: Sequence[str],
    n: int,
    samples: int,
    sampling: Sampling,
    engine_settings: Any,
    lora_rank: int = 16,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The metrics of summarise(), with the evaluation's size and time. With `cache_dir`, the
    base model's samples come from, or go into, the same cache as the trainer's reference
    samples (trainer.reference.cached_reference: keyed by the model, the prompts, N x samples,
    the sampling and the reward): every adapter evaluated on one machine is then compared
    with the same base and BoN-N samples (its gain fraction differs from another's by the
    adapters alone), and an evaluation draws only the adapter's samples, ~40 % of the time."""
    from vllm.lora.request import LoRARequest

    from trainer.reference import (
        build_lora_llm,
        cached_reference,
        close_llm,
        prompt_progress,
        sample_with_vllm,
        scored_rows,
        store_reference,
    )
    from vbon.evaluation import adapter_kl, sample_adapter
    from vbon.prompts import render_task

    t0 = time.monotonic()
    base_rows, cache_path, key = (
        cached_reference(cache_dir, model_path, openings, n * samples, sampling, reward)
        if cache_dir is not None
        else (None, None, None)
    )
    from_cache = base_rows is not None
    # The seed drives the engine's sampling: the same seed repeats an evaluation's draw (up
    # to bf16 batching), another seed is an independent draw of the adapter's samples.
    llm = build_lora_llm(engine_settings, model_path, lora_rank, seed=seed)
    try:
        tok = llm.get_tokenizer()
        texts = [render_task(tok, o) for o in openings]
        lora = LoRARequest("eval-adapter", 1, str(adapter_dir.resolve()))
        base_samples = None
        if not from_cache:
            base_samples = sample_with_vllm(
                llm, openings, n * samples, sampling, stage="evaluation: base model"
            )
        drawn = sample_adapter(
            llm, texts, lora, sampling, samples,
            use_tqdm=prompt_progress(f"evaluation: adapter ({samples} per prompt)"),
        )  # fmt: skip
    finally:
        close_llm(llm)
    t_gen = time.monotonic() - t0
    if base_rows is None:
        assert base_samples is not None
        base_rows = scored_rows(openings, base_samples, reward)
        if cache_path is not None and key is not None:
            store_reference(cache_path, key, base_rows)
    base_rewards = [row.rewards for row in base_rows]
    tr_rewards = [row.rewards for row in scored_rows(openings, drawn.by_prompt(), reward)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kl, _ = adapter_kl(model_path, adapter_dir, drawn, pad_id=pad)
    metrics = summarise(base_rewards, tr_rewards, n, kl, drawn.texts, seed=seed)
    metrics.update(
        eval_prompts=len(openings),
        eval_samples_per_prompt=samples,
        eval_n=n,
        eval_seconds=round(time.monotonic() - t0, 1),
        eval_generation_seconds=round(t_gen, 1),
        eval_base_samples_cached=from_cache,
        eval_seed=seed,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    from trainer.jobspec import engine_settings_for
    from trainer.provenance import versions
    from vbon.adapters import META_FILE, validate_adapter, write_json_atomic
    from vbon.prompts import default_prompt_file, load_prompts
    from vbon.rewards import load_reward

    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="adapter folder (with vbon.json)")
    parser.add_argument("--eval-prompts", default="", help="held-out prompt file (JSONL)")
    parser.add_argument("--eval-num-prompts", type=int, default=0, help="first K (0: all)")
    parser.add_argument("--samples", type=int, default=2, help="samples (groups) per prompt")
    parser.add_argument("--n", type=int, default=0, help="BoN-N to compare (default: adapter's N)")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="the engine's sampling seed (and the bootstrap's): another seed draws the "
        "adapter's samples anew, for re-evaluations to pool; cached base samples stay shared",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", default="runs/cache",
        help="the base model's samples are read from / written to this folder, shared with "
        "the trainer's reference samples (python -m trainer's <work-dir>/cache), so adapters "
        "are compared on the same base samples; '' draws them anew and keeps nothing",
    )  # fmt: skip
    parser.add_argument("--write", action="store_true", help="store the metrics in vbon.json")
    parser.add_argument(
        "--model", default="",
        help="the base model folder (default: the adapter's base_model, which vbon.json "
        "records by folder name: 'smollm2-135m-instruct' is the embedded model)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        meta = validate_adapter(args.adapter)
        n = args.n or meta.n or 8
        if n < 2:
            raise ConfigError("--n must be >= 2")
        openings = load_prompts(args.eval_prompts or default_prompt_file("eval"))
        if args.eval_num_prompts:
            openings = openings[: args.eval_num_prompts]
        reward = load_reward(meta.reward)
        sampling = Sampling(**{k: v for k, v in meta.sampling.items() if k != "stop"}) \
            if meta.sampling else Sampling()
        from vbon.models import resolve_model

        model_path = resolve_model(args.model or meta.base_model)
        settings = engine_settings_for(model_path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = evaluate_adapter(
        args.adapter, model_path=model_path, reward=reward, openings=openings, n=n,
        samples=args.samples, sampling=sampling, engine_settings=settings,
        lora_rank=meta.lora_rank or 16, seed=args.seed,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    print(json.dumps(metrics, indent=2))
    if args.write:
        data = json.loads((args.adapter / META_FILE).read_text())
        data.setdefault("metrics", {}).update(metrics)
        data.setdefault("versions", {}).update(versions())
        write_json_atomic(args.adapter / META_FILE, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
