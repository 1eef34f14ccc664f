"""Shared fixtures. Tiers: unit tests (fast, fakes of the same interfaces), `engine` tests
(a real vLLM engine on the embedded model), end-to-end tests over real HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.figures"]  # the `figures` fixture and the reliability summary table
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from vbon.models import prepare_embedded

    return prepare_embedded(ROOT / "models")


def _tiny_llama_classifier(out: Path, tokenizer_dir: Path, seed: int, **config: object) -> Path:
    """A randomly initialised Llama sequence classifier with the embedded model's tokenizer,
    saved in `out` (one layer, 2 heads, 64 positions; `config` sets the rest)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.eos_token_id,
        **config,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> Path:
    """A randomly initialised 2-label Llama sequence classifier, with the embedded tokenizer."""
    return _tiny_llama_classifier(
        tmp_path_factory.mktemp("tiny-classifier"),
        embedded_model,
        seed=0,
        hidden_size=16,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> Path:
    """A randomly initialised single-logit (num_labels=1) Llama reward model that vLLM's CPU
    pooling runner can serve (head_dim 32: vLLM-CPU's attention has no kernel for head_dim 8)."""
    return _tiny_llama_classifier(
        tmp_path_factory.mktemp("tiny-reward-model"),
        embedded_model,
        seed=1,
        hidden_size=64,
        intermediate_size=64,
        num_labels=1,
    )
