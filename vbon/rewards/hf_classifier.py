"""Any Hugging Face sequence-classification folder as a reward model (e.g. the paper's
DistilBERT IMDB sentiment classifier): the reward is one label's raw logit."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from vbon.errors import ConfigError
from vbon.rewards.base import check_batch

POSITIVE_NAMES = ("positive", "pos")


def pick_label(id2label: dict[int, str], num_labels: int, label: int | str | None) -> int:
    """The logit index to use: an index, a label name, or by default a 'positive' label when
    the config names one, else the last one."""
    if label is None or label == "":
        for idx, name in id2label.items():
            if str(name).lower() in POSITIVE_NAMES:
                return int(idx)
        # Unnamed binary sentiment heads put "positive" at index 1 by convention.
        return num_labels - 1
    if isinstance(label, int) or str(label).lstrip("-").isdigit():
        idx = int(label)
        if not 0 <= idx < num_labels:
            raise ConfigError(
                f"reward label index {idx} is out of range: the classifier has {num_labels} "
                f"labels (0..{num_labels - 1}: {dict(id2label)})"
            )
        return idx
    for idx, name in id2label.items():
        if str(name).lower() == str(label).lower():
            return int(idx)
    raise ConfigError(
        f"reward label '{label}' is not one of the classifier's labels {sorted(id2label.values())}"
    )


class HFClassifierReward:
    """Batched scoring with truncation to what the classifier can read."""

    def __init__(
        self,
        path: str | Path,
        label: int | str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        device: str = "cpu",
        inputs: Literal["completion", "prompt+completion"] = "completion",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.name = f"hf:{Path(self.path).name}"
        self._path_digest = hashlib.sha256(str(Path(self.path).resolve()).encode()).hexdigest()[:12]
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.path)
        except Exception as exc:
            raise ConfigError(
                f"cannot load a sequence classifier from '{self.path}' ({exc}): give a folder "
                "saved with AutoModelForSequenceClassification.save_pretrained"
            ) from exc
        self._model.eval().to(device)
        self._device = device
        cfg = self._model.config
        self.label_index = pick_label(
            {int(k): v for k, v in (cfg.id2label or {}).items()}, cfg.num_labels, label
        )
        limits = [max_length]
        if getattr(cfg, "max_position_embeddings", None):
            limits.append(int(cfg.max_position_embeddings))
        tok_max = getattr(self._tok, "model_max_length", None)
        if tok_max and tok_max < 10**6:
            limits.append(int(tok_max))
        self.max_length = min(limits)
        self.batch_size = batch_size
        self.inputs = inputs
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core
        self._torch = torch

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        texts = (
            list(completions)
            if self.inputs == "completion"
            else [p + c for p, c in zip(prompts, completions, strict=True)]
        )
        # An empty text has no tokens with a tokenizer that adds none, and the forward fails;
        # a space stands in for it (as vbon.rewards.remote sends it, so both score alike).
        texts = [t or " " for t in texts]
        out: list[float] = []
        with self._lock, self._torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self._tok(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self._device)
                logits = self._model(**batch).logits
                out.extend(logits[:, self.label_index].float().cpu().tolist())
        return out

    def describe(self) -> dict[str, object]:
        # Shown by /ready, so the folder's name and not its path on this machine. The path's
        # digest keeps what describe() keys (the trainer's caches) apart for two folders of
        # one name.
        return {
            "backend": "hf-classifier",
            "model": Path(self.path).name,
            "path_sha256": self._path_digest,
            "label_index": self.label_index,
            "max_length": self.max_length,
            "input": self.inputs,
        }
