"""Reward models behind one interface: `load_reward(spec)` gives a RewardModel.

spec: "vader" (embedded default) or a path to a Hugging Face sequence-classification folder
(optionally prefixed "hf:")."""

from __future__ import annotations

from pathlib import Path

from vbon.errors import ConfigError
from vbon.rewards.base import RewardModel

BACKENDS = ("vader", "hf:<folder>")


def load_reward(
    spec: str,
    *,
    label: int | str | None = None,
    batch_size: int = 32,
    max_length: int = 512,
    device: str = "cpu",
) -> RewardModel:
    text = spec.strip()
    if text.lower() == "vader":
        from vbon.rewards.vader import VaderReward

        return VaderReward()
    path_text = text[3:] if text.startswith("hf:") else text
    path = Path(path_text).expanduser()
    if path.is_dir():
        from vbon.models import check_model_dir
        from vbon.rewards.hf_classifier import HFClassifierReward

        check_model_dir(path, kind="reward model")
        return HFClassifierReward(
            path, label=label, batch_size=batch_size, max_length=max_length, device=device
        )
    if text.startswith("hf:") or "/" in text or path.suffix:
        raise ConfigError(
            f"reward model folder '{path_text}' does not exist: give a folder saved with "
            "AutoModelForSequenceClassification.save_pretrained"
        )
    raise ConfigError(
        f"unknown reward backend '{spec}': use 'vader' (embedded) or the path of a Hugging Face "
        "sequence-classification folder (optionally as 'hf:<path>')"
    )


__all__ = ["BACKENDS", "RewardModel", "load_reward"]
