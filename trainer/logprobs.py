"""Sequence log-probabilities of completions under a causal LM (optionally with its LoRA
adapter disabled, which gives the base model): the exact objective's log pi_ref(y) and the
evaluation's KL estimate sum_t log pi(y_t) - log pi_ref(y_t)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


@torch.no_grad()
def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    disable_adapter: bool = False,
    batch_size: int = 32,
) -> list[float]:
    """sum_t log p(completion_t | prompt, completion_<t) per row, in float32."""
    out: list[float] = []
    ctx = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    device = next(model.parameters()).device
    with ctx, torch.autocast(device.type, enabled=False):
        for start in range(0, len(prompt_ids), batch_size):
            ps = prompt_ids[start : start + batch_size]
            cs = completion_ids[start : start + batch_size]
            seqs = [list(p) + list(c) for p, c in zip(ps, cs, strict=True)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            target = torch.zeros((len(seqs), width), dtype=torch.bool)
            for i, (s, p) in enumerate(zip(seqs, ps, strict=True)):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
                target[i, len(p) : len(s)] = True
            ids, mask, target = ids.to(device), mask.to(device), target.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            tok = tok * target[:, 1:]
            out.extend(tok.sum(-1).tolist())
    return out
