"""A placeholder vBoN adapter: random LoRA weights shaped like a trained one, so that vBoN's
speed can be measured (python -m clients.bench) where no trained adapter is installed. Its
vbon.json marks it as such; its rewards mean nothing."""

from __future__ import annotations

from pathlib import Path


def make_placeholder_adapter(folder: Path, model_path: str, rank: int = 16) -> Path:
    """A random LoRA (rank 16 on all attention and MLP projections, like a trained adapter):
    it has the speed of a real vBoN adapter, not its quality; the report says so."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vbon.adapters import AdapterMeta, staged_folder

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        init_lora_weights=False,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    with staged_folder(folder, overwrite=True) as tmp:
        get_peft_model(model, cfg).save_pretrained(tmp)
        meta = AdapterMeta(
            name=folder.name,
            n=8,
            beta=1 / 7,
            base_model=model_path,
            lora_rank=rank,
            metrics={"placeholder": "random weights, speed only"},
        )
        (tmp / "vbon.json").write_text(meta.model_dump_json(indent=1))
    return folder
