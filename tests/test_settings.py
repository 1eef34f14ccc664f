from __future__ import annotations

from pathlib import Path

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
    env = engine.cpu_environment(
        CoreSettings(cpu_threads="all", cpu_preload=False, kv_cache_gb=3, fast_cpu_lora=False)
    )
    assert env == {
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "VLLM_CPU_OMP_THREADS_BIND": "0-3",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # The plugin's settings reach the engine process even when set in code.
        "VBON_FAST_CPU_LORA": "False",
        "VBON_MERGED_LORA_MAX_GB": "2.0",
    }
    from vbon.settings import VllmPatchSettings

    patches = VllmPatchSettings(**{k[5:].lower(): v for k, v in env.items() if k[:5] == "VBON_"})
    assert patches.fast_cpu_lora is False and patches.merged_lora_max_gb == 2.0
    env = engine.cpu_environment(CoreSettings(cpu_threads="auto", cpu_preload=False))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_engine_kwargs_never_take_model_generation_config(embedded_model) -> None:
    from vbon.engine import engine_kwargs

    kw = engine_kwargs(CoreSettings(), model_path=str(embedded_model))
    assert kw["generation_config"] == "vllm"
    assert kw["enable_lora"] is True and kw["enable_prefix_caching"] is True


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "gateway.example"])
@pytest.mark.parametrize("key", [None, ""])
def test_reachable_host_needs_an_api_key(
    monkeypatch: pytest.MonkeyPatch, host: str, key: str | None
) -> None:
    from server.settings import ServerSettings

    monkeypatch.setenv("VBON_HOST", host)
    if key is not None:
        monkeypatch.setenv("VBON_API_KEY", key)
    monkeypatch.setenv("VBON_ADMIN_KEY", "admin-SECRET-1234")
    monkeypatch.setenv("VBON_UPSTREAM_API_KEY", "upstream-SECRET-5678")
    with pytest.raises(ConfigError) as exc:
        load_settings(ServerSettings)
    message = str(exc.value)
    # Names the variable and every way out.
    assert "VBON_API_KEY" in message and f"VBON_HOST={host}" in message
    assert "VBON_HOST=127.0.0.1" in message and "VBON_ALLOW_NO_KEY=true" in message
    assert "SECRET" not in message  # quotes no other setting
    monkeypatch.setenv("VBON_ALLOW_NO_KEY", "true")
    assert load_settings(ServerSettings).allow_no_key is True
    monkeypatch.delenv("VBON_ALLOW_NO_KEY")
    monkeypatch.setenv("VBON_API_KEY", "k" * 32)
    assert load_settings(ServerSettings).api_key.get_secret_value() == "k" * 32


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_host_runs_without_a_key(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    from server.settings import ServerSettings

    monkeypatch.setenv("VBON_HOST", host)
    assert load_settings(ServerSettings).api_key is None


def test_server_refuses_to_start_open_on_all_interfaces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`python -m server` exits with the fix-it message before loading anything."""
    import server.__main__ as main

    monkeypatch.setenv("VBON_HOST", "0.0.0.0")
    monkeypatch.delenv("VBON_API_KEY", raising=False)
    monkeypatch.delenv("VBON_ALLOW_NO_KEY", raising=False)
    monkeypatch.setattr(main, "serve", lambda *a: pytest.fail("the server started"))
    assert main.main() == 2
    assert "VBON_API_KEY" in capsys.readouterr().err


def test_the_settings_reference_is_generated_from_the_settings_classes() -> None:
    """docs/settings.md and .env.example list every setting the gateway reads, as the class
    states it: change a setting, run `python -m server.settings_doc`."""
    from server.settings import ServerSettings
    from server.settings_doc import render

    for path, text in render().items():
        assert path.read_text() == text, f"{path} is stale: run python -m server.settings_doc"
    doc = render()[next(iter(render()))]
    for name in ServerSettings.model_fields:
        assert f"`VBON_{name.upper()}`" in doc


def test_every_client_setting_is_documented_with_its_default() -> None:
    """docs/clients.md names every variable clients.settings.ClientSettings reads, with its
    default where it has one: add a setting there, document it."""
    from clients.settings import ClientSettings
    from vbon.settings_doc import rows

    doc = (Path(__file__).resolve().parent.parent / "docs" / "clients.md").read_text()
    for var, default, _ in rows(ClientSettings):
        assert f"`{var}`" in doc, f"docs/clients.md does not document {var}"
        if default != "None":
            assert f"`{var}` (default `{default}`)" in doc


def test_the_readme_settings_table_matches_the_settings_classes() -> None:
    """The README's short settings table is hand-picked, so a test keeps it true: every
    variable it names exists in ServerSettings, with the default it shows."""
    import re

    from server.settings import ServerSettings
    from vbon.settings_doc import rows

    defaults = {var: default for var, default, _ in rows(ServerSettings)}
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| `VBON_")]
    assert len(table) >= 5, "the README's settings table is gone"

    def same(shown: str, actual: str) -> bool:
        if shown.lower() == "none":
            return actual == "None"
        try:
            return float(shown) == float(actual)
        except ValueError:
            return shown == actual

    for line in table:
        var_cell, default_cell = line.split("|")[1:3]
        names = re.findall(r"`(VBON_[A-Z0-9_]+)`", var_cell)
        shown = [d.strip().strip("`") for d in default_cell.split(",")]
        for name in names:
            assert name in defaults, f"README names {name}, which no setting reads"
        for name, default in zip(names, shown, strict=False):
            assert same(default, defaults[name]), (
                f"README shows {name} default {default!r}; the setting's is {defaults[name]!r}"
            )
