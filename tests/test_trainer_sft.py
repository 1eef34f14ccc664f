"""trainer/sft.py: the completion-only SFT loss equals the plain full-logits cross-entropy (value
and LoRA gradients) on the embedded model with a random LoRA, with prompts of different lengths
and right padding (two rows of one prompt, which share its forward); the --sft-kl-coef term
equals the full-logits KL to the base."""

from __future__ import annotations

import contextlib
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
    ids[2, :9] = ids[0, :9]  # rows 0 and 2: two samples of one prompt (they share its forward)
    for row, (prompt, length) in enumerate([(9, 20), (5, 14), (9, 17)]):
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
            nll, count, kl = completion_nll_sum(model, ids, mask, labels)
            assert kl is None
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
    assert co == cf == (20 - 9) + (14 - 5) + (17 - 9)
    torch.testing.assert_close(lo, lf, atol=1e-5, rtol=1e-5)
    assert go.keys() == gf.keys() and len(go) == 2 * 2 * 30  # A and B of 2 modules x 30 layers
    for n in go:
        torch.testing.assert_close(go[n], gf[n], atol=1e-5, rtol=1e-3)


def test_kl_term_matches_the_full_logits_kl_to_the_base(embedded_model: Path) -> None:
    from trainer.sft import completion_nll_sum

    model = _lora_model(embedded_model)
    ids, mask, labels = _batch()
    _, count, kl = completion_nll_sum(model, ids, mask, labels, model.disable_adapter)
    kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
    per_position = (logp.exp() * (logp - base)).sum(-1)
    expected = (per_position * (labels[:, 1:] != -100)).sum()
    assert float(expected) > 0.01  # the random adapter moved the model
    torch.testing.assert_close(kl.detach(), expected, atol=1e-4, rtol=1e-4)
    # The base against itself: no KL.
    with model.disable_adapter():
        _, _, zero = completion_nll_sum(model, ids, mask, labels, contextlib.nullcontext)
    assert abs(float(zero)) < 1e-5


def test_weights_scale_each_rows_loss(embedded_model: Path) -> None:
    """--warm-start-loss advantage: each row's NLL times its weight (negative ones included),
    and TRL's collator with ours passes each example's weight beside its own row."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trainer.sft import completion_nll_sum, weighted_collator

    model = _lora_model(embedded_model)
    ids, mask, labels = _batch()
    with torch.no_grad():
        rows = [completion_nll_sum(model, ids[i : i + 1], mask[i : i + 1], labels[i : i + 1])[0]
                for i in range(3)]
        weights = torch.tensor([0.5, -1.25, 2.0])
        weighted, count, _ = completion_nll_sum(model, ids, mask, labels, weights=weights)
    assert int(count) == 28
    expected = sum(w * r for w, r in zip(weights, rows, strict=True))
    torch.testing.assert_close(weighted, expected, atol=1e-4, rtol=1e-4)

    collate = weighted_collator(DataCollatorForLanguageModeling(pad_token_id=0))
    examples = [  # as SFTTrainer's prepared dataset holds them: labels from completion_mask
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "weight": 0.5},
        {"input_ids": [5, 9], "labels": [-100, 9], "weight": -2.0},
    ]
    batch = collate(examples)
    assert batch["weights"].tolist() == [0.5, -2.0]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]


def test_prompt_completion_layout_left_pads_prompts() -> None:
    """TRL's right-padded rows become [left-padded prompt | right-padded completion] with the
    completion's labels as targets; a row labelled from its first token keeps that token as
    its prompt (no logit predicts it)."""
    from trainer.sft import prompt_completion_layout

    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([
        [-100, -100, 7, 8, 9, -100],  # prompt 2, completion 3
        [-100, 2, 3, -100, -100, -100],  # prompt 1, completion 2
        [4, 5, 6, 7, -100, -100],  # labelled from the first token
    ])
    new_ids, new_mask, targets = prompt_completion_layout(ids, mask, labels)
    assert new_ids.tolist() == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 0], [0, 4, 5, 6, 7]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert targets.tolist() == [[7, 8, 9], [2, 3, -100], [5, 6, 7]]
