from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vbon.errors import ConfigError
from vbon.models import (
    MARKER,
    check_model_dir,
    convert_gguf,
    is_complete,
    prepare_embedded,
    resolve_model,
)


def test_embedded_model_is_a_complete_hf_folder(embedded_model: Path) -> None:
    assert is_complete(embedded_model)
    cfg = json.loads((embedded_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (embedded_model / "chat_template.jinja").exists() or "chat_template" in (
        embedded_model / "tokenizer_config.json"
    ).read_text()


def test_prepare_is_idempotent(embedded_model: Path) -> None:
    before = (embedded_model / "model.safetensors").stat().st_mtime_ns
    assert prepare_embedded(embedded_model.parent) == embedded_model
    assert (embedded_model / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_embedded_aliases(embedded_model: Path) -> None:
    for alias in ("embedded", "default", ""):
        assert Path(resolve_model(alias, embedded_model.parent)) == embedded_model


def test_modified_folder_is_not_complete(embedded_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(embedded_model, copy)
    assert is_complete(copy)
    with (copy / "model.safetensors").open("r+b") as f:  # a half-copied weights file
        f.truncate(1000)
    assert not is_complete(copy)
    with pytest.raises(ConfigError, match="incomplete or corrupted"):
        check_model_dir(copy)


def test_folder_without_marker_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not is_complete(tmp_path)
    (tmp_path / MARKER).write_text("not json")
    assert not is_complete(tmp_path)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "is a file"),
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), "corrupt config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "no weights"),
    ],
)
def test_bad_model_paths(tmp_path: Path, setup, message: str) -> None:
    target = tmp_path / "model"
    setup(target)
    with pytest.raises(ConfigError, match=message):
        resolve_model(str(target))


def test_corrupted_gguf_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    out = tmp_path / "models" / "converted"
    with pytest.raises(ConfigError, match="cannot read the GGUF file .*reinstall"):
        convert_gguf(gguf, out)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no temporary folder left behind
