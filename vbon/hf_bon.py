"""Best-of-N the way a transformers / TRL user does it, the benchmark's baseline for the
gateway's BoN: per prompt, `generate(num_return_sequences=N)` with the shared sampling settings
(vbon.sampling), the same reward model, keep the best; timed one prompt at a time.

(TRL 1.16 has no BestOfNSampler any more; this is what it did.)"""

from __future__ import annotations

import statistics
import time
from typing import Any


def hf_bon(
    model_path: str,
    prompts: list[str],
    ns: list[int],
    max_tokens: int,
    dtype: str,
    threads: int,
    reward_spec: str,
    progress: Any,
) -> list[dict[str, Any]]:
    """For each N in `ns`, BoN-N on every prompt, one at a time (after one warm-up call): a
    row of answers/s, generated tokens/s and per answer, mean latency and mean best reward.
    `progress` advances once per prompt and N."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vbon.prompts import render_task
    from vbon.rewards import load_reward
    from vbon.sampling import Sampling, hf_generation_config

    torch.set_num_threads(threads)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).eval()
    reward = load_reward(reward_spec)
    eos = tok.eos_token_id
    texts = [render_task(tok, p) for p in prompts]

    def run(text: str, n: int) -> tuple[int, float]:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        cfg = hf_generation_config(Sampling(max_tokens=max_tokens), tok, n=n)
        with torch.inference_mode():
            out = model.generate(**ids, generation_config=cfg)
        new = out[:, ids["input_ids"].shape[1] :].tolist()
        completions, tokens = [], 0
        for row in new:
            cut = row.index(eos) + 1 if eos in row else len(row)
            tokens += cut
            completions.append(tok.decode(row[:cut], skip_special_tokens=True))
        rewards = reward.score([text] * n, completions)
        return tokens, max(rewards)

    run(texts[0], ns[0])  # warm-up (one-time allocations)
    rows = []
    for n in ns:
        t0 = time.perf_counter()
        tokens, best = 0, []
        lat = []
        for text in texts:
            t1 = time.perf_counter()
            k, b = run(text, n)
            lat.append(time.perf_counter() - t1)
            tokens += k
            best.append(b)
            progress.update(1)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "n": n,
                "prompts": len(texts),
                "wall_s": wall,
                "answers_per_s": len(texts) / wall,
                "gen_tokens_per_s": tokens / wall,
                "tokens_per_answer": tokens / len(texts),
                "latency_mean_s": statistics.fmean(lat),
                "mean_reward": statistics.fmean(best),
            }
        )
    return rows
