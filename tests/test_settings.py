from __future__ import annotations

import pytest

from vbon.cpu import default_dtype, has_native_bf16
from vbon.errors import ConfigError
from vbon.settings import CoreSettings, load_settings


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VBON_MODEL", "/some/model")
    monkeypatch.setenv("VBON_MAX_MODEL_LEN", "512")
    monkeypatch.setenv("VBON_DTYPE", "float32")
    s = load_settings(CoreSettings)
    assert (s.model, s.max_model_len, s.dtype) == ("/some/model", 512, "float32")


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("VBON_DTYPE", "int3", "VBON_DTYPE"),
        ("VBON_MAX_MODEL_LEN", "ten", "VBON_MAX_MODEL_LEN"),
        ("VBON_KV_CACHE_GB", "0", "VBON_KV_CACHE_GB"),
        ("VBON_REWARD", "  ", "VBON_REWARD"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, field: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=field):
        load_settings(CoreSettings)


def test_dtype_follows_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import vbon.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not has_native_bf16() and default_dtype() == "float32"
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert has_native_bf16() and default_dtype() == "bfloat16"


def test_cpu_environment_uses_all_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import vbon.engine as engine

    monkeypatch.setattr(engine, "cpu_count", lambda: 4)
    env = engine.cpu_environment(CoreSettings(cpu_threads="all", cpu_preload=False, kv_cache_gb=3))
    assert env == {
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "VLLM_CPU_OMP_THREADS_BIND": "0-3",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    env = engine.cpu_environment(CoreSettings(cpu_threads="auto", cpu_preload=False))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_engine_kwargs_never_take_model_generation_config(embedded_model) -> None:
    from vbon.engine import engine_kwargs

    kw = engine_kwargs(CoreSettings(), model_path=str(embedded_model))
    assert kw["generation_config"] == "vllm"
    assert kw["enable_lora"] is True and kw["enable_prefix_caching"] is True
