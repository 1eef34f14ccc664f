"""Reward models behind one interface: `load_reward(spec)` gives a RewardModel.

spec: "vader" (embedded default), a path to a Hugging Face sequence-classification folder
(optionally prefixed "hf:"), or the http(s)://host:port of a vLLM pooling server serving one
(vbon.rewards.remote)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vbon.errors import ConfigError
from vbon.rewards.base import RewardModel
from vbon.rewards.remote import RewardServerError, is_remote_spec

BACKENDS = ("vader", "hf:<folder>", "http(s)://host:port")


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach a remote reward server (VBON_REWARD_MODEL, _API_KEY, _TIMEOUT_S, _RETRIES)."""

    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 30.0
    retries: int = 2


def load_reward(
    spec: str,
    *,
    label: int | str | None = None,
    batch_size: int = 32,
    max_length: int = 512,
    device: str = "cpu",
    remote: RemoteOptions | None = None,
) -> RewardModel:
    text = spec.strip()
    if is_remote_spec(text):
        from vbon.rewards.remote import RemoteReward

        if remote is None:
            # The trainer and the evaluation pass only the spec: the key, model name and
            # timeouts then come from the same VBON_REWARD_* settings the gateway reads.
            from vbon.settings import CoreSettings, load_settings

            remote = load_settings(CoreSettings).remote_reward_options()
        return RemoteReward(
            text,
            model=remote.model,
            label=label,
            api_key=remote.api_key,
            timeout_s=remote.timeout_s,
            retries=remote.retries,
            max_length=max_length,
        )
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
        f"unknown reward backend '{spec}': use 'vader' (embedded), the path of a Hugging Face "
        "sequence-classification folder (optionally as 'hf:<path>') or the http(s)://host:port "
        "of a vLLM pooling server"
    )


__all__ = [
    "BACKENDS",
    "RemoteOptions",
    "RewardModel",
    "RewardServerError",
    "load_reward",
]
