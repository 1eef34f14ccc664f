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
