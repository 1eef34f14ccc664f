"""trainer/sft.py: the completion-only SFT loss equals the plain full-logits cross-entropy (value
and LoRA gradients) on the embedded model with a random LoRA, with prompts of different lengths
and right padding."""

from __future__ import annotations

from pathlib import Path

import torch


def _lora_model(embedded_model: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(100, 20000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, length) in enumerate([(9, 20), (5, 14), (12, 17)]):
        labels[row, :prompt] = -100  # the prompt is not learned
        labels[row, length:] = -100  # right padding
        mask[row, length:] = 0
    return ids, mask, labels


def test_completion_only_loss_matches_the_full_logits_loss(embedded_model: Path) -> None:
    from trainer.sft import completion_nll_sum

    model = _lora_model(embedded_model)
    ids, mask, labels = _batch()
    results = []
    for path in ("ours", "full"):
        model.zero_grad()
        if path == "ours":
            nll, count = completion_nll_sum(model, ids, mask, labels)
            loss = nll / count
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
            )
            count = (labels[:, 1:] != -100).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), int(count), grads))
    (lo, co, go), (lf, cf, gf) = results
    assert co == cf == (20 - 9) + (14 - 5) + (17 - 12)
    torch.testing.assert_close(lo, lf, atol=1e-5, rtol=1e-5)
    assert go.keys() == gf.keys() and len(go) == 2 * 2 * 30  # A and B of 2 modules x 30 layers
    for n in go:
        torch.testing.assert_close(go[n], gf[n], atol=1e-5, rtol=1e-3)
