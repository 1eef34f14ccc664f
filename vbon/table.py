"""Plain-text and markdown tables (no extra dependency)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def text_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    wrap_last: bool = True,
    width: int | None = None,
) -> str:
    """A boxed-free aligned table; the last column is cut to fit the terminal width."""
    cells = [[_one_line(fmt(c)) for c in row] for row in rows]
    heads = [str(h) for h in headers]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
    width = width or shutil.get_terminal_size((120, 24)).columns
    if wrap_last and heads:
        fixed = sum(widths[:-1]) + 2 * (len(widths) - 1)
        widths[-1] = max(len(heads[-1]), min(widths[-1], max(20, width - fixed)))

    def line(parts: Sequence[str]) -> str:
        out = []
        for i, p in enumerate(parts):
            w = widths[i]
            if len(p) > w:
                p = p[: max(1, w - 1)] + "…"
            out.append(
                p.ljust(w) if i == len(parts) - 1 else p.rjust(w) if _numeric(p) else p.ljust(w)
            )
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(heads), sep, *(line(r) for r in cells)])


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(v: Any) -> str:
        return _one_line(fmt(v)).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |"]
    out.append(
        "|"
        + "|".join("---:" if _numeric(esc(rows[0][i])) else "---" for i in range(len(headers)))
        + "|"
        if rows
        else "|" + "|".join("---" for _ in headers) + "|"
    )
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
