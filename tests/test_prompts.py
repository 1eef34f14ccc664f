from __future__ import annotations

from pathlib import Path

import pytest

from vbon.errors import ConfigError
from vbon.prompts import default_prompt_file, load_prompts, render_task, task_messages


def test_default_prompt_sets_are_disjoint_and_short() -> None:
    train = load_prompts(default_prompt_file("train"))
    evals = load_prompts(default_prompt_file("eval"))
    assert len(train) >= 550 and len(evals) >= 180
    assert not set(train) & set(evals)
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    for p in train + evals:
        assert 2 <= len(p.split()) <= 8, p


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no prompts"),
        ('{"prompt": "ok"}\n{not json}\n', ":2: not valid JSON"),
        ('{"text": "x"}\n', ':1: each line needs a non-empty "prompt"'),
        ('{"prompt": "   "}\n', "non-empty"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_prompts(f)


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "none.jsonl")


def test_task_rendering_uses_the_chat_template(embedded_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model)
    text = render_task(tok, "The film was")
    assert "The film was" in text and text.endswith("<|im_start|>assistant\n")
    assert task_messages("x")[0]["role"] == "user"
