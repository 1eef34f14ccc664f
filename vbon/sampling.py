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
    # vLLM's sampling extensions (its OpenAI server accepts them), neutral by default. The
    # first four change the distribution each token is drawn from; the rest only decide where
    # a sample ends and how its text is written.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def with_(self, **changes: Any) -> Sampling:
        return replace(self, **changes)

    def extensions(self) -> dict[str, Any]:
        """The vLLM extensions set to something other than their neutral default."""
        return {
            k: v for k, v in asdict(self).items() if k in EXTENSIONS and v != EXTENSIONS[k]
        }

    def reshaping(self) -> list[str]:
        """Which set extensions change the distribution each token is drawn from."""
        return [k for k in self.extensions() if k in RESHAPING]

    def to_dict(self) -> dict[str, Any]:
        # The extensions only when set: run identities, cache keys and adapter metadata written
        # before they existed keep their meaning.
        d = {k: v for k, v in asdict(self).items() if k not in EXTENSIONS}
        d["stop"] = list(self.stop)
        for k, v in self.extensions().items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d


# name -> neutral value, for every extension field of Sampling.
EXTENSIONS: dict[str, Any] = {
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "min_tokens": 0,
    "ignore_eos": False,
    "stop_token_ids": (),
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
}
RESHAPING = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


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
        **{k: list(v) if isinstance(v, tuple) else v for k, v in s.extensions().items()},
    )
    if output_kind is not None:
        kwargs["output_kind"] = output_kind
    return SamplingParams(**kwargs)


def hf_generation_config(s: Sampling, tokenizer: Any, n: int = 1) -> Any:
    """A transformers GenerationConfig with exactly these settings and nothing from the
    model's generation_config.json (no repetition penalty, no default top_k=50)."""
    from transformers import GenerationConfig

    if s.extensions():  # (nothing here maps them; better refused than silently dropped)
        raise ValueError(f"transformers generation does not take {sorted(s.extensions())}")
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
