"""`python -m server` refuses bad settings before any long work, with a message and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VBON_REWARD": "sentiment-xl"}, "unknown reward backend 'sentiment-xl'"),
        ({"VBON_MODEL": "/no/such/model"}, "model path '/no/such/model' does not exist"),
        ({"VBON_MAX_N": "zero"}, "VBON_MAX_N"),
        ({"VBON_DTYPE": "int4"}, "VBON_DTYPE"),
    ],
)
def test_bad_settings_exit_2_with_a_message(env: dict[str, str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
