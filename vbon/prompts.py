"""Prompt sets and prompt formatting, stated once for training, serving and evaluation.

The default task (the paper's controlled generation, offline): continue the opening of a movie
review. Each opening becomes one chat turn through the model's chat template, exactly the same
way for reference samples, training rollouts, the gateway and the evaluation.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from vbon.errors import ConfigError

TASK_INSTRUCTION = "Continue this movie review in one or two sentences: {opening}"


def task_messages(opening: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": TASK_INSTRUCTION.format(opening=opening)}]


def default_prompt_file(split: str) -> Path:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return Path(str(resources.files("vbon") / "data" / f"prompts_{split}.jsonl"))


def load_prompts(path: str | Path) -> list[str]:
    """Openings from JSONL rows with a "prompt" string (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"prompt file '{p}' does not exist: give a JSONL file with "
            '{"prompt": "..."} per line'
        )
    prompts: list[str] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{p}:{lineno}: not valid JSON ({exc})") from exc
        text = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{p}:{lineno}: each line needs a non-empty "prompt" string')
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"prompt file '{p}' holds no prompts")
    return prompts


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text the model sees for a chat: its own template plus the assistant turn header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_task(tokenizer: Any, opening: str) -> str:
    return render_chat(tokenizer, task_messages(opening))
