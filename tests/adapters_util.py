"""Helpers that make small real LoRA adapter folders for tests."""

from __future__ import annotations

from pathlib import Path

from vbon.adapters import AdapterMeta


def make_fake_adapter(
    folder: Path, n: int = 8, seed: int = 0, base_model: str = "fake-model"
) -> Path:
    """A structurally valid adapter (peft file names, readable safetensors) for API tests."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        '{"r": 8, "lora_alpha": 16, "peft_type": "LORA", "target_modules": ["q_proj"]}'
    )
    save_file(
        {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 16)},
        str(folder / "adapter_model.safetensors"),
    )
    meta = AdapterMeta(name=folder.name, n=n, beta=1 / (n - 1), m=16, base_model=base_model)
    (folder / "vbon.json").write_text(meta.model_dump_json(indent=1))
    return folder


def make_peft_adapter(
    base_model: Path, folder: Path, n: int = 8, rank: int = 8, seed: int = 0
) -> Path:
    """A real random peft LoRA adapter for the embedded model (for the real engine)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(folder)
    meta = AdapterMeta(
        name=folder.name, n=n, beta=1 / (n - 1), m=16, base_model=str(base_model), lora_rank=rank
    )
    (folder / "vbon.json").write_text(meta.model_dump_json(indent=1))
    return folder


def make_trained_adapter(
    base_model: Path,
    folder: Path,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    steps: int = 8,
    learning_rate: float = 1e-4,
    rank: int = 16,
    seed: int = 0,
) -> Path:
    """A peft LoRA adapter on every attention and MLP projection, trained for a few Adam steps
    (fp32) to raise the log-probability of the given completions: small, coherent per-layer
    changes like a real trained adapter's, which a random adapter does not have."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    peft_model = get_peft_model(model, cfg)
    optimizer = torch.optim.Adam(
        [p for p in peft_model.parameters() if p.requires_grad], lr=learning_rate
    )
    for _ in range(steps):
        loss = torch.zeros(())
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            ids = torch.tensor([list(p) + list(c)])
            logp = torch.log_softmax(peft_model(input_ids=ids).logits[0, len(p) - 1 : -1], -1)
            loss = loss - logp.gather(-1, torch.tensor(c).unsqueeze(-1)).sum() / len(prompt_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(folder)
    meta = AdapterMeta(
        name=folder.name, n=8, beta=1 / 7, m=16, base_model=str(base_model), lora_rank=rank
    )
    (folder / "vbon.json").write_text(meta.model_dump_json(indent=1))
    return folder
