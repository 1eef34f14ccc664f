"""Figures of the reliability checks (inputs tried, 5xx seen, requests shed, RSS growth, faults
injected and survived), printed as one table at the end of the run and written to
runs/reliability/summary.{json,md}. A plugin of tests/conftest.py; tests ask for `figures`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from vbon.adapters import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("check", "inputs", "5xx", "shed", "rss_growth_mb", "faults", "survived", "note")
_ROWS: list[dict[str, Any]] = []


class Figures:
    """What a check tried and saw; one row per check in the summary table."""

    def add(self, check: str, **fields: Any) -> None:
        unknown = set(fields) - set(COLUMNS)
        assert not unknown, f"unknown summary columns {unknown}"
        _ROWS.append({"check": check, **fields})


@pytest.fixture(scope="session")
def figures() -> Figures:
    return Figures()


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    out = Path(os.environ.get("VBON_RELIABILITY_DIR", ROOT / "runs" / "reliability"))
    out.mkdir(parents=True, exist_ok=True)
    table = summary_markdown(_ROWS)
    write_text_atomic(out / "summary.md", table)
    write_json_atomic(out / "summary.json", {"rows": _ROWS})
    terminalreporter.write_sep("=", "reliability summary")
    terminalreporter.write(table)
    terminalreporter.write_line(f"(written to {out}/summary.md and summary.json)")
