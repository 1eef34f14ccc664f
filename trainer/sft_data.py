"""The SFT datasets of the bon-sft method and vbon's warm start (--warm-start-loss), built from
the reference samples: which samples each prompt contributes (BoN-N's winners, or weighted
samples), tokenized here, in the order the batches read them (--sft-batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trainer.reference import ReferenceRow

if TYPE_CHECKING:
    from datasets import Dataset

    from trainer.jobspec import Job

# --sft-batches prompt-chunks: a prompt's examples come in runs of this many (~half of the
# ~7 a bon-weighted warm start keeps per prompt, so a batch of 32 holds ~8 prompts).
SFT_CHUNK = 4
# bon-weighted: samples less likely than this to be BoN-N's choice are left out.
BON_WEIGHT_FLOOR = 0.01


def bon_sft_dataset(
    job: Job, tok: Any, rows: list[ReferenceRow], rounds: int = 1
) -> Dataset:
    """The best of each group of N reference samples per prompt (M // N examples each), for
    each of `rounds` partitions of a prompt's samples into groups.

    Round 0 groups the samples as stored (they are i.i.d., so that is already a random
    partition); each later round draws a fresh random partition (seeded). Each round is an
    unbiased draw of BoN-N's samples given the M; fresh partitions let a sample that lost in
    one round's group win in another's, so several epochs see more of BoN-N's distribution
    than the same M // N winners repeated (at 3 epochs the result did not change measurably:
    measured).

    Tokenized here rather than by TRL: SFTTrainer appends EOS to every completion, but most
    reference samples were cut at max_tokens, and teaching the model to end there costs
    ~16 nats of drift per example (measured on the embedded model). A sample gets EOS only
    when it ended before max_tokens.
    """
    import random

    n = job.cfg.n
    rng = random.Random(job.cfg.seed)
    orders = [list(range(len(row.rewards))) for row in rows]
    picks: list[list[dict[int, float]]] = []  # per round, per prompt: {winner: 1.0}
    for r in range(rounds):
        picks.append([])
        for order, row in zip(orders, rows, strict=True):
            if r:
                rng.shuffle(order)
            # A partition's groups are disjoint, so each winner comes once per round.
            groups = (order[g * n : (g + 1) * n] for g in range(len(order) // n))
            picks[-1].append({max(grp, key=row.rewards.__getitem__): 1.0 for grp in groups})
    return _prompt_grouped_dataset(job, tok, rows, picks, weighted=False)


def advantage_dataset(
    job: Job, tok: Any, rows: list[ReferenceRow], rounds: int = 1
) -> Dataset:
    """--warm-start-loss advantage: per prompt, each reference sample whose log F-hat(r) lies
    above the mean over the prompt's M (F-hat against the same M, as the RL stage's reward),
    with weight A = log F-hat(r) - that mean, once per round. BoN-SFT's weight sits on each
    group's winner (about F-hat^(N-1)), so the tilt it learns follows the top samples; A grows
    about linearly with the reward's rank and gives weight to half the samples. The samples
    below the mean are left out: with their negative weights one epoch diverged (the RL stage
    after it read 161 nats of KL). Tokenized as in
    bon_sft_dataset."""
    from vbon.bon import log_cdf_hat

    def weigh(row: ReferenceRow) -> dict[int, float]:
        log_f = [log_cdf_hat(row.sorted_rewards, r) for r in row.rewards]
        mean = sum(log_f) / len(log_f)
        return {i: lf - mean for i, lf in enumerate(log_f) if lf > mean}

    return _weighted_dataset(job, tok, rows, rounds, weigh)



def bon_weighted_dataset(
    job: Job, tok: Any, rows: list[ReferenceRow], rounds: int = 1
) -> Dataset:
    """--warm-start-loss bon-weighted: per prompt, each reference sample weighted by its
    probability of being BoN-N's choice among the M (vbon.bon.bon_win_probs), once per round.
    BoN-SFT draws those choices (the winner of each group of N); this is their expectation, the
    same target without the draw's noise. Samples under BON_WEIGHT_FLOOR are left out (at
    N = 8, M = 16 the top 7 carry 99 % of the weight); the kept weights are scaled to average 1,
    so an epoch moves about as far per example as BoN-SFT's. Tokenized as in
    bon_sft_dataset."""
    from vbon.bon import bon_win_probs

    def weigh(row: ReferenceRow) -> dict[int, float]:
        probs = bon_win_probs(row.rewards, job.cfg.n)
        kept = {i: p for i, p in enumerate(probs) if p >= BON_WEIGHT_FLOOR}
        scale = len(kept) / sum(kept.values())
        return {i: p * scale for i, p in kept.items()}

    return _weighted_dataset(job, tok, rows, rounds, weigh)


def _weighted_dataset(
    job: Job,
    tok: Any,
    rows: list[ReferenceRow],
    rounds: int,
    weigh: Callable[[ReferenceRow], dict[int, float]],
) -> Dataset:
    """Rows (prompt + sample i, weight) for each prompt's {i: weight}, once per round."""
    weights = [weigh(row) for row in rows]
    return _prompt_grouped_dataset(job, tok, rows, [weights] * rounds, weighted=True)


def _prompt_grouped_dataset(
    job: Job,
    tok: Any,
    rows: list[ReferenceRow],
    picks: list[list[dict[int, float]]],
    *,
    weighted: bool,
) -> Dataset:
    """The SFT dataset: round after round, each round's prompts in a fresh seeded order, a
    prompt's examples next to each other. Read in that order (--sft-batches by-prompt), a
    batch holds whole prompts and each prompt goes through the model once per batch
    (trainer.logprobs.shared_prefix_logits); --sft-batches prompt-chunks (the default) cuts
    each prompt's examples into runs of SFT_CHUNK and orders the runs of all prompts at
    random, so a batch shares each prompt's forward among ~SFT_CHUNK rows but mixes ~4x more
    prompts; shuffled, the trainer draws the examples at random. picks[round][prompt] maps a
    sample index to its weight (`weighted`: kept as the `weight` column; BoN-SFT has none)."""
    import random

    from datasets import Dataset

    from vbon.prompts import render_task

    max_tokens = job.sampling.max_tokens
    rng = random.Random(job.cfg.seed)
    prompts: dict[int, tuple[str, list[int]]] = {}  # rendered and tokenized once per prompt
    tokens: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def example(p: int, i: int) -> tuple[list[int], list[int]]:
        if (p, i) not in tokens:
            if p not in prompts:
                prompt = render_task(tok, rows[p].prompt)
                prompts[p] = (prompt, tok(prompt, add_special_tokens=False)["input_ids"])
            prompt, prompt_ids = prompts[p]
            ids = sample_token_ids(tok, prompt, prompt_ids, rows[p].responses[i], max_tokens)
            tokens[p, i] = (prompt_ids + ids, [0] * len(prompt_ids) + [1] * len(ids))
        return tokens[p, i]

    data: dict[str, list[Any]] = {"input_ids": [], "completion_mask": []}
    if weighted:
        data["weight"] = []
    chunk = SFT_CHUNK if job.cfg.sft_batches == "prompt-chunks" else 0
    for per_prompt in picks:
        runs = []  # (prompt, its examples next to each other): whole prompts or chunks
        for p, items in enumerate(per_prompt):
            pairs = list(items.items())
            size = chunk or max(len(pairs), 1)
            runs += [(p, pairs[k : k + size]) for k in range(0, len(pairs), size)]
        rng.shuffle(runs)
        for p, pairs in runs:
            for i, weight in pairs:
                ids, mask = example(p, i)
                data["input_ids"].append(ids)
                data["completion_mask"].append(mask)
                if weighted:
                    data["weight"].append(weight)
    return Dataset.from_dict(data)


def sample_token_ids(
    tok: Any, prompt: str, prompt_ids: list[int], text: str, max_tokens: int
) -> list[int]:
    """A reference sample's tokens as they follow `prompt` (the prompt ends on a special
    token, so the boundary does not merge; a divergence would be a template change, hence the
    check), with EOS only when the sample ended before `max_tokens` (the sampler cut the
    others; see bon_sft_dataset)."""
    ids = tok(prompt + text, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the rendered prompt does not tokenize as a prefix: {prompt[-40:]!r}")
    ids = ids[len(prompt_ids) :]
    return [*ids, tok.eos_token_id] if len(ids) < max_tokens else ids


# --warm-start-loss (and the bon-sft method): its dataset and how the log names it.
WARM_START_DATA: dict[str, tuple[Callable[..., Dataset], str]] = {
    "bon-sft": (bon_sft_dataset, "BoN-{n} SFT"),
    "advantage": (advantage_dataset, "advantage-weighted reference samples"),
    "bon-weighted": (bon_weighted_dataset, "reference samples weighted by their BoN-{n} win "
                     "probability"),
}
