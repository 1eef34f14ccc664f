"""Per-token log-probabilities of completions under the policy being trained, with gradients,
for the RL loss (trainer/rloo.py) and the warm start (trainer/sft.py): only the completion's
positions reach the LM head, and rows that share a prompt share its forward. Sequence sums
without gradients (KL estimates, the exact objective's log pi_ref) are vbon.logprobs'."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def completion_log_softmax(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    logits_to_keep: int,
    temperature: float,
    share_prefix: bool = True,
) -> torch.Tensor:
    """float32 log-softmax of logits / temperature over the vocabulary at the positions that
    predict the last `logits_to_keep` tokens; only those positions reach the LM head.

    Rows whose columns before the last `logits_to_keep` (the prompt, left-padded) are equal go
    through the model once for that prefix (`share_prefix`, see shared_prefix_logits)."""
    logits = shared_prefix_logits(model, ids, mask, logits_to_keep) if share_prefix else None
    if logits is None:
        # One more position than scored: the logit at t predicts token t+1.
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1)
        logits = out.logits[:, :-1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def shared_prefix_logits(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    logits_to_keep: int,
) -> torch.Tensor | None:
    """The logits that predict the last `logits_to_keep` tokens of each row, computing each
    distinct prefix (the columns before them) once: the distinct prefixes go through the model
    with its KV cache kept, the cache is gathered out to the rows, and the rows' last tokens
    go through on top of it. Same values as one forward over the whole rows up to rounding
    (positions and masks are the same), and gradients flow through the gathered cache into the
    prefix's forward. A warm-start or RL batch holds several samples per prompt (~7 and 8),
    and the ~45-token chat prompt is over half of each row's tokens, so this about halves
    the tokens a training step computes (docs/trainer.md). None when no two rows share a
    prefix."""
    width = ids.size(1)
    prefix = width - logits_to_keep
    if prefix < 1 or logits_to_keep < 1:
        return None
    key = ids[:, :prefix] if mask is None else torch.cat([ids[:, :prefix], mask[:, :prefix]], 1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.size(0) == ids.size(0):
        return None
    # A representative row of each distinct prefix (its first).
    rows = torch.arange(ids.size(0), device=ids.device)
    first = torch.full((distinct.size(0),), ids.size(0), device=ids.device, dtype=rows.dtype)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    head = model(
        input_ids=ids[first, :prefix],
        attention_mask=None if mask is None else mask[first, :prefix],
        use_cache=True,
        logits_to_keep=1,
    )
    logits = [head.logits[inverse]]  # the prefix's last position predicts the first token
    if logits_to_keep > 1:
        cache = head.past_key_values
        cache.batch_select_indices(inverse)
        # The last token's logit would predict past the row: it is not computed.
        tail = model(
            input_ids=ids[:, prefix:-1],
            attention_mask=None if mask is None else mask[:, :-1],
            past_key_values=cache,
            use_cache=True,
        )
        logits.append(tail.logits)
    return torch.cat(logits, dim=1)


def completion_logps_and_entropies(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    temperature: float,
    compute_entropy: bool,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities (of logits divided by `temperature`) and entropies of the last
    `logits_to_keep` tokens of each row, in float32, with gradients for the log-probabilities
    (the RL loss); rows go through the model `batch_size` at a time. Only those positions reach
    the LM head (the models' own `logits_to_keep`)."""
    logps, entropies = [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size]
        mask = attention_mask[start : start + batch_size]
        logp_all = completion_log_softmax(model, ids, mask, logits_to_keep, temperature)
        target = ids[:, -logits_to_keep:]
        logps.append(logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        if compute_entropy:
            with torch.no_grad():  # logged only, as in TRL
                entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None)


def completion_logps_and_token_kl(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    base_context: Callable[[], contextlib.AbstractContextManager],
    temperature: float,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the last `logits_to_keep` tokens (with gradients), the
    exact per-position KL(pi(.|prefix) || pi_base(.|prefix)) summed over the vocabulary (with
    gradients through pi), the base model's log-probabilities of the same tokens and entropies
    (the last two without gradients), all float32. The base is `model` inside `base_context()`
    (the LoRA adapter disabled). Summed over a completion, the KL estimates the sequence KL
    like sum_t log pi(y_t) - log pi_base(y_t) but does not depend on which token was sampled.
    Under bf16 autocast its value comes out low (1.34 vs 1.78 nats in fp32 on a trained
    adapter: policy and base logits are rounded to the same bf16 grid, which hides small
    differences), while the sampled-token form stays unbiased (1.843 vs 1.844)."""
    logps, kls, base_logps, entropies = [], [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size]
        mask = attention_mask[start : start + batch_size]
        with torch.no_grad(), base_context():
            base_logp = completion_log_softmax(model, ids, mask, logits_to_keep, temperature)
        logp_all = completion_log_softmax(model, ids, mask, logits_to_keep, temperature)
        target = ids[:, -logits_to_keep:].unsqueeze(-1)
        logps.append(logp_all.gather(-1, target).squeeze(-1))
        base_logps.append(base_logp.gather(-1, target).squeeze(-1))
        probs = logp_all.exp()
        kls.append((probs * (logp_all - base_logp)).sum(-1))
        with torch.no_grad():
            entropies.append(-(probs * logp_all).sum(-1))
    return torch.cat(logps), torch.cat(kls), torch.cat(base_logps), torch.cat(entropies)
