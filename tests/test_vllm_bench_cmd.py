"""`python -m clients.vllm_bench` end to end on a gateway with the fake engine (the same
client runs against the real engine in tests/test_server_engine.py): vLLM's bench runs for
every model with the gateway's key, and the table, JSON and plot are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients import vllm_bench
from server.app import create_app
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend
from tests.server_proc import serve_in_thread

KEY = "bench-key-0123456789"


def test_the_command_writes_its_table(
    tmp_path: Path, embedded_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    settings = ServerSettings(
        adapters_dir=tmp_path / "adapters", adapter_poll_s=0, api_key=KEY, max_tokens_limit=64
    )
    fake = FakeBackend()
    app = create_app(settings, backend_factory=lambda s: fake, background_load=False)
    monkeypatch.setenv("VBON_API_KEY", KEY)  # the client's key, as a user sets it
    out = tmp_path / "out"
    with serve_in_thread(app) as url:
        rc = vllm_bench.main([
            "--url", url, "--models", "fake-model,vbon-8,bon-8", "--num-prompts", "4",
            "--concurrency", "2", "--input-len", "16", "--output-len", "8",
            "--tokenizer", str(embedded_model), "--out", str(out),
        ])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "vllm_bench.json").read_text())
    assert [r["model"] for r in result["runs"]] == ["fake-model", "vbon-8", "bon-8"]
    assert all(r["completed"] == 4 and r["failed"] == 0 for r in result["runs"])
    # bon-8 drew 8 samples per answer, and its usage counted them all.
    assert len([c for c in fake.calls if c["n"] == 8]) == 4
    bon = result["runs"][2]
    assert bon["total_output_tokens"] > 4 * 8 >= result["runs"][0]["total_output_tokens"]
    md = (out / "vllm_bench.md").read_text()
    assert "| bon-8 | 4 | 0 |" in md and "cores" in md and "clients.vllm_bench" in md
    assert (out / "vllm_bench.png").stat().st_size > 1000
    # A wrong key: the bench fails and the command says so (exit 1), writing nothing new.
    monkeypatch.setenv("VBON_API_KEY", "wrong")
    with serve_in_thread(create_app(settings, backend_factory=lambda s: FakeBackend(),
                                    background_load=False)) as url:
        assert vllm_bench.main(["--url", url, "--models", "fake-model", "--num-prompts", "2",
                                "--tokenizer", str(embedded_model),
                                "--out", str(tmp_path / "out2")]) == 1
    assert not (tmp_path / "out2").exists()
