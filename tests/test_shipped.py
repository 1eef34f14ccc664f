"""Shipped adapters: the base-weights fingerprint, installing them, the precedence of a user's
adapter over a shipped one, the recipes that reproduce them, and the shipped files themselves."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapter_registry import AdapterRegistry
from tests.adapters_util import make_fake_adapter
from trainer.config import RECIPES_DIR, parse_config
from vbon.adapters import AdapterMeta, read_meta
from vbon.base_weights import weights_sha256
from vbon.errors import ConfigError
from vbon.models import EMBEDDED_NAME
from vbon.shipped import SERVING_FILES, SHIPPED_DIR, install_shipped

ROOT = Path(__file__).resolve().parent.parent


def _set_meta(folder: Path, **update: object) -> Path:
    meta = read_meta(folder).model_copy(update=update)
    (folder / "vbon.json").write_text(meta.model_dump_json())
    return folder


def _base(folder: Path, shards: int = 1, bump: float = 0.0) -> Path:
    """A 'model folder' of safetensors files holding tensors a, b, c (in `shards` files)."""
    folder.mkdir(parents=True)
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4) + bump,
               "c": torch.zeros(2, dtype=torch.bfloat16)}
    names = sorted(tensors)
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(folder / f"model-{i}.safetensors"), metadata={"shard": str(i)})
    (folder / "config.json").write_text("{}")
    return folder


def test_weights_fingerprint_is_the_tensors_not_the_files(tmp_path: Path) -> None:
    one = weights_sha256(_base(tmp_path / "one"))
    assert one is not None and one.startswith("sha256:")
    assert weights_sha256(_base(tmp_path / "sharded", shards=2)) == one  # same tensors
    assert weights_sha256(_base(tmp_path / "other", bump=1e-3)) != one  # other values
    assert weights_sha256(tmp_path / "missing") is None
    assert weights_sha256("org/hub-id") is None


def test_install_copies_missing_shipped_adapters_only(tmp_path: Path) -> None:
    source = tmp_path / "shipped"
    for name, base in (("vbon-n8-shipped", EMBEDDED_NAME), ("vbon-n4-shipped", EMBEDDED_NAME),
                       ("for-another-model", "other-model")):
        make_fake_adapter(source / name, base_model=base)
        (source / name / "curves.csv").write_text("not needed to serve\n")
    adapters = tmp_path / "adapters"
    mine = make_fake_adapter(adapters / "vbon-n4-shipped", seed=5, base_model=EMBEDDED_NAME)
    before = (mine / "adapter_model.safetensors").read_bytes()

    assert install_shipped(adapters, f"/some/where/{EMBEDDED_NAME}", source) == [
        "vbon-n8-shipped"
    ]
    assert sorted(p.name for p in (adapters / "vbon-n8-shipped").iterdir()) == sorted(
        SERVING_FILES
    )
    assert (mine / "adapter_model.safetensors").read_bytes() == before  # never overwritten
    assert not (adapters / "for-another-model").exists()  # not for this server's base
    assert sorted(p.name for p in adapters.iterdir()) == ["vbon-n4-shipped", "vbon-n8-shipped"]
    assert install_shipped(adapters, EMBEDDED_NAME, source) == []  # idempotent


def _registry(adapters: Path, base: str = "") -> AdapterRegistry:
    reg = AdapterRegistry(adapters, max_rank=16, base_model=base)
    asyncio.run(reg.scan())
    return reg


def test_a_user_adapter_takes_precedence_over_a_shipped_one(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    _set_meta(make_fake_adapter(adapters / "vbon-n8-shipped"), shipped=True)
    _set_meta(make_fake_adapter(adapters / "vbon-n4-shipped", n=4), shipped=True)
    reg = _registry(adapters)
    assert reg.for_n(8).name == "vbon-n8-shipped" and reg.default().name == "vbon-n8-shipped"

    make_fake_adapter(adapters / "vbon-n8", seed=1)  # the user trains vBoN-8
    asyncio.run(reg.scan())
    assert reg.for_n(8).name == "vbon-n8" and reg.default().name == "vbon-n8"
    assert reg.for_n(4).name == "vbon-n4-shipped"
    # A shipped adapter installed later (a newer version) still does not win.
    (adapters / "vbon-n8-shipped" / "vbon.json").touch()
    _set_meta(adapters / "vbon-n8-shipped", shipped=True, seed=9)
    asyncio.run(reg.scan())
    assert reg.for_n(8).version > 0 and reg.for_n(8).name == "vbon-n8"

    import shutil

    shutil.rmtree(adapters / "vbon-n8")  # the user's goes: the shipped one serves again
    asyncio.run(reg.scan())
    assert reg.for_n(8).name == "vbon-n8-shipped"


def test_an_adapter_for_other_base_weights_is_refused(tmp_path: Path) -> None:
    base = _base(tmp_path / EMBEDDED_NAME)
    adapters = tmp_path / "adapters"
    _set_meta(make_fake_adapter(adapters / "ours", base_model=EMBEDDED_NAME),
              base_weights_sha256=weights_sha256(base))
    _set_meta(make_fake_adapter(adapters / "theirs", base_model=EMBEDDED_NAME),
              base_weights_sha256=weights_sha256(_base(tmp_path / "x", bump=1.0)))
    reg = _registry(adapters, base=str(base))
    assert [v.name for v in reg.all()] == ["ours"]
    why = reg.refused_reasons()["theirs"]
    assert "other base weights" in why and EMBEDDED_NAME in why and "Retrain" in why


def test_recipes_load_and_flags_override_them() -> None:
    cfg = parse_config(["--recipe", "vbon-n8"])
    assert (cfg.method, cfg.n, cfg.seed) == ("vbon", 8, 0)
    assert Path(cfg.config) == RECIPES_DIR / "vbon-n8.yaml"
    assert parse_config(["--recipe", "vbon-n8", "--seed", "3"]).seed == 3
    assert parse_config(["--config", str(RECIPES_DIR / "vbon-n16.yaml")]).n == 16
    for name in ("kl-rl-b0.1", "bon-sft-n8", "vbon-n4"):
        parse_config(["--recipe", name])
    with pytest.raises(ConfigError, match="vbon-n8"):  # the error lists the recipes
        parse_config(["--recipe", "no-such-recipe"])


def test_recipe_record_and_portable_base(tmp_path: Path) -> None:
    from trainer.provenance import portable_model_name, recipe_record

    cfg = parse_config(["--recipe", "vbon-n4"])
    rec = recipe_record(cfg, ["--recipe", "vbon-n4"])
    assert rec["file"] == "trainer/recipes/vbon-n4.yaml"
    assert rec["sha256"] == hashlib.sha256((RECIPES_DIR / "vbon-n4.yaml").read_bytes()).hexdigest()
    assert rec["command"] == "python -m trainer --recipe vbon-n4"
    folder = tmp_path / "models" / "my-model"
    folder.mkdir(parents=True)
    assert portable_model_name(str(folder)) == "my-model"
    assert portable_model_name("org/hub-model") == "org/hub-model"


def test_ship_stores_bf16_serving_files(tmp_path: Path) -> None:
    from trainer.ship import ship

    src = _set_meta(make_fake_adapter(tmp_path / "vbon-n8", base_model=f"/abs/{EMBEDDED_NAME}"),
                    base_weights_sha256="sha256:" + "1" * 64)
    (src / "curves.csv").write_text("step\n")
    out = ship(src, tmp_path / "shipped")
    assert out.name == "vbon-n8-shipped"
    assert sorted(p.name for p in out.iterdir()) == sorted(SERVING_FILES)
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {
        torch.bfloat16
    }
    meta = read_meta(out)
    assert meta.shipped and meta.base_model == EMBEDDED_NAME and meta.name == out.name
    with pytest.raises(ConfigError, match="base_weights_sha256"):
        ship(make_fake_adapter(tmp_path / "old"), tmp_path / "shipped")


SHIPPED_NS = (4, 8, 16)


@pytest.mark.parametrize("n", SHIPPED_NS)
def test_the_shipped_adapters_say_how_they_were_made(n: int, embedded_model: Path) -> None:
    folder = SHIPPED_DIR / f"vbon-n{n}-shipped"
    assert sorted(p.name for p in folder.iterdir()) == sorted(SERVING_FILES)
    meta = AdapterMeta.model_validate_json((folder / "vbon.json").read_text())
    assert meta.shipped and meta.method == "vbon" and meta.n == n
    assert meta.base_model == EMBEDDED_NAME  # portable: a name, no path
    assert "/" not in json.loads((folder / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    # Trained on the weights `make model` converts here (else the gateway refuses it).
    assert meta.base_weights_sha256 == weights_sha256(embedded_model)
    recipe = meta.recipe or {}
    path = ROOT / recipe["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recipe["sha256"]
    assert parse_config(["--recipe", str(path)]).n == n and "--recipe" in recipe["command"]
    assert meta.seed is not None and meta.steps and meta.versions.get("trl")
    m = meta.metrics
    for key in ("gain_fraction_of_bon", "kl_to_base", "reward_trained"):
        assert isinstance(m[key], float) and m[f"{key}_se"] > 0
    assert m["eval_n"] == n and len(m["eval_seeds"]) >= 3 and m["eval_prompts"] >= 200
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert (folder / "adapter_model.safetensors").stat().st_size < 12_000_000
