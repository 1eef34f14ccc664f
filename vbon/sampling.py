"""Sampling settings, stated once for every path that generates: the gateway, the reference
samples and rollouts of the trainer, the benchmark and the evaluation.

The model's own generation_config.json must never slip in: vLLM is started with
generation_config="vllm" (see vbon.engine) and transformers gets a GenerationConfig built from
these fields alone (see `hf_generation_config`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# The paper samples with temperature 1, top_p 1 and no top-k: pure ancestral sampling, which is
# what the BoN distribution and the KL estimates assume.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # 0 = no top-k (vLLM and transformers both read 0 as disabled)
DEFAULT_MAX_TOKENS = 32  # the paper used 40; 32 keeps CPU training inside its time budget


@dataclass(frozen=True)
class Sampling:
    """One request's sampling parameters (per sample; `n` is given separately)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def with_(self, **changes: Any) -> Sampling:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def vllm_params(
    s: Sampling,
    n: int = 1,
    *,
    logprobs: int | None = None,
    output_kind: Any | None = None,
) -> Any:
    """vLLM SamplingParams for `n` samples.

    Seeds: with `s.seed` set, vLLM gives sample i of an n>1 request the seed `seed + i`
    (vllm/v1/engine/parallel_sampling.py), so one request with n=N reproduces and candidate i
    can be replayed with n=1, seed=seed+i. Exactly so in float32; in bf16 a replay decoded in
    a batch of another size can round a near-tied token the other way and diverge from there.
    """
    from vllm import SamplingParams

    kwargs: dict[str, Any] = dict(
        n=n,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else 0,
        seed=s.seed,
        stop=list(s.stop) or None,
        logprobs=logprobs,
    )
    if output_kind is not None:
        kwargs["output_kind"] = output_kind
    return SamplingParams(**kwargs)


def hf_generation_config(s: Sampling, tokenizer: Any, n: int = 1) -> Any:
    """A transformers GenerationConfig with exactly these settings and nothing from the
    model's generation_config.json (no repetition penalty, no default top_k=50)."""
    from transformers import GenerationConfig

    greedy = s.temperature == 0
    eos = tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else s.temperature,
        top_p=None if greedy else s.top_p,
        top_k=None if greedy else s.top_k,
        max_new_tokens=s.max_tokens,
        num_return_sequences=n,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        repetition_penalty=None,
    )
