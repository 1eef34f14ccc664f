"""Writing a run's results (JSON, markdown table, PNG plots): shared by the benchmark and the
evaluation. JSON and markdown are replaced atomically, so a killed run never leaves half a file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vbon.adapters import write_json_atomic, write_text_atomic


def write_report(
    out: Path,
    stem: str,
    result: dict[str, Any],
    render_markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], list[str]],
) -> None:
    write_json_atomic(out / f"{stem}.json", result)
    md = render_markdown(result)
    write_text_atomic(out / f"{stem}.md", md)
    files = plot(result, out)
    print(md)
    print(
        f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}, "
        + ", ".join(str(out / f) for f in files)
    )
