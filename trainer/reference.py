"""Reference statistics: M base-model samples per training prompt, their rewards, sorted.

Drawn with vLLM (one request with n=M per prompt, all prompts in one batch), under the one
sampler of vbon.sampling and the gateway's prompt formatting (vbon.prompts.render_task). Cached
on disk as JSONL in the gateway's BoN-log format ({"prompt", "responses", "rewards"} per line),
keyed by model, prompts, M, sampling settings, reward and seed; any change recomputes. The seed
seeds the sampling engine, so runs with other --seed values train on independent samples.
`--reference-from FILE` reads the same format instead.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbon.adapters import write_json_atomic
from vbon.errors import ConfigError
from vbon.sampling import Sampling, vllm_params

logger = logging.getLogger(__name__)


@dataclass
class ReferenceRow:
    prompt: str  # the opening (un-rendered), as the gateway logs it
    responses: list[str]
    rewards: list[float]

    @property
    def sorted_rewards(self) -> list[float]:
        return sorted(self.rewards)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "responses": self.responses, "rewards": self.rewards}


def read_reference_file(path: Path, min_samples: int) -> list[ReferenceRow]:
    """Rows of {"prompt": str, "responses": [str], "rewards": [float]}; each needs at least
    `min_samples` rewards (N, for F-hat of BoN-N)."""
    if not path.is_file():
        raise ConfigError(
            f"reference file '{path}' does not exist: give JSONL with "
            '{"prompt": ..., "responses": [...], "rewards": [...]} per line'
        )
    rows: dict[str, ReferenceRow] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ConfigError(f'{where}: expected an object with "prompt" and "rewards"')
        prompt, rewards = obj.get("prompt"), obj.get("rewards")
        responses = obj.get("responses") or []
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f'{where}: "prompt" must be a non-empty string')
        if not isinstance(rewards, list) or not all(
            isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r)
            for r in rewards
        ):
            raise ConfigError(f'{where}: "rewards" must be a list of finite numbers')
        if responses and len(responses) != len(rewards):
            raise ConfigError(
                f'{where}: "responses" ({len(responses)}) and "rewards" ({len(rewards)}) '
                "differ in length"
            )
        if prompt in rows:  # the gateway logs each request: pool repeated prompts
            rows[prompt].responses.extend(responses)
            rows[prompt].rewards.extend(float(r) for r in rewards)
        else:
            rows[prompt] = ReferenceRow(prompt, list(responses), [float(r) for r in rewards])
    if not rows:
        raise ConfigError(f"reference file '{path}' holds no rows")
    short = [p for p, r in rows.items() if len(r.rewards) < min_samples]
    if short:
        raise ConfigError(
            f"reference file '{path}': {len(short)} prompt(s) have fewer than {min_samples} "
            f"rewards (e.g. {short[0]!r} has {len(rows[short[0]].rewards)}); F-hat for BoN-N "
            "needs at least N reference samples per prompt"
        )
    return list(rows.values())


def write_reference_file(path: Path, rows: Sequence[ReferenceRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_json()) + "\n")
    tmp.replace(path)


def cache_key(
    model_path: str,
    prompts: Sequence[str],
    m: int,
    sampling: Sampling,
    reward: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """What the cached samples depend on. The model is identified by its folder and its
    weights' sizes and modification times (cheap; a re-conversion changes them)."""
    model = Path(model_path)
    files = {}
    if model.is_dir():
        for p in sorted(model.iterdir()):
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
                st = p.stat()
                files[p.name] = [st.st_size, int(st.st_mtime)]
    return {
        "model": str(model.resolve()) if model.exists() else model_path,
        "model_files": files,
        "prompts": list(prompts),
        "m": m,
        "sampling": sampling.to_dict(),
        "reward": reward,
        "seed": seed,
        "format": 2,  # 2: the engine's seed is part of the key
    }


def build_lora_llm(
    engine_settings: Any, model_path: str, lora_rank: int, **overrides: Any
) -> Any:
    """An offline vLLM engine that accepts adapters of `lora_rank` (the engine's max rank is
    raised for it when the settings' is lower)."""
    from vbon.engine import build_llm

    if lora_rank > engine_settings.max_lora_rank:
        overrides["max_lora_rank"] = lora_rank
    return build_llm(engine_settings, model_path=model_path, **overrides)


def close_llm(llm: Any) -> None:
    """Stop a vLLM LLM's engine process now (its CPU threads would compete with training)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # pragma: no cover - best effort
        logger.warning("engine shutdown: %s", exc)
    del llm
    gc.collect()


def prompt_progress(desc: str) -> Callable[..., Any]:
    """vLLM's progress bar over finished prompts (LLM.generate's use_tqdm), named for the
    stage it measures: the reference stage and the evaluation each run for minutes."""
    from tqdm.auto import tqdm

    def bar(*iterable: Any, **kwargs: Any) -> Any:
        # vLLM opens two: one over the requests it adds (given the iterable), then this one.
        if not iterable:
            kwargs["desc"] = desc
        return tqdm(*iterable, **kwargs)

    return bar


def sample_with_vllm(
    llm: Any,
    openings: Sequence[str],
    n: int,
    sampling: Sampling,
    lora: Any | None = None,
    stage: str = "reference samples",
) -> list[list[str]]:
    """n completions per opening: one request with n=N per prompt, all prompts batched; the
    progress bar is named `stage`."""
    from vbon.prompts import render_task

    tok = llm.get_tokenizer()
    texts = [render_task(tok, o) for o in openings]
    outs = llm.generate(
        texts, vllm_params(sampling, n=n), lora_request=lora,
        use_tqdm=prompt_progress(f"{stage} ({n} per prompt)"),
    )  # fmt: skip
    return [[c.text for c in out.outputs] for out in outs]


def compute_reference(
    *,
    model_path: str,
    openings: Sequence[str],
    m: int,
    sampling: Sampling,
    reward: Any,
    engine_settings: Any,
    seed: int = 0,
) -> list[ReferenceRow]:
    from vbon.engine import build_llm

    t0 = time.monotonic()
    llm = build_llm(engine_settings, model_path=model_path, seed=seed)
    try:
        logger.info(
            "engine ready in %.0f s; sampling %d x %d", time.monotonic() - t0, len(openings), m
        )
        samples = sample_with_vllm(llm, openings, m, sampling)
    finally:
        close_llm(llm)
    rows = scored_rows(openings, samples, reward)
    logger.info("reference samples done in %.0f s", time.monotonic() - t0)
    return rows


def scored_rows(
    openings: Sequence[str], samples: Sequence[list[str]], reward: Any
) -> list[ReferenceRow]:
    """Each opening's samples with their rewards (one batched reward call per prompt)."""
    rows = []
    for opening, responses in zip(openings, samples, strict=True):
        rewards = reward.score([opening] * len(responses), responses)
        rows.append(ReferenceRow(opening, responses, [float(r) for r in rewards]))
    return rows


def cached_reference(
    cache_dir: Path, model_path: str, openings: Sequence[str], m: int, sampling: Sampling,
    reward: Any, seed: int = 0,
) -> tuple[list[ReferenceRow] | None, Path, dict[str, Any]]:
    """The cached base-model samples for these prompts (None when absent or stale), the cache
    file they belong in, and their key (see cache_key)."""
    from trainer.config import stable_hash

    key = cache_key(model_path, openings, m, sampling, reward.describe(), seed)
    path = cache_dir / f"reference-{stable_hash(key)[:16]}.jsonl"
    if path.is_file():
        try:
            rows = read_reference_file(path, min_samples=m)
            if [r.prompt for r in rows] == list(openings):
                logger.info("base-model samples from cache %s", path)
                return rows, path, key
        except ConfigError as exc:
            logger.warning("ignoring unreadable sample cache %s: %s", path, exc)
    return None, path, key


def store_reference(path: Path, key: dict[str, Any], rows: Sequence[ReferenceRow]) -> None:
    write_reference_file(path, rows)
    write_json_atomic(path.with_suffix(".key.json"), key)


def load_or_compute_reference(
    *,
    cache_dir: Path,
    model_path: str,
    openings: Sequence[str],
    m: int,
    sampling: Sampling,
    reward: Any,
    engine_settings: Any,
    seed: int = 0,
) -> tuple[list[ReferenceRow], Path]:
    rows, path, key = cached_reference(
        cache_dir, model_path, openings, m, sampling, reward, seed
    )
    if rows is not None:
        return rows, path
    rows = compute_reference(
        model_path=model_path,
        openings=openings,
        m=m,
        sampling=sampling,
        reward=reward,
        engine_settings=engine_settings,
        seed=seed,
    )
    store_reference(path, key, rows)
    return rows, path
