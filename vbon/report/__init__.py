"""Writing a run's results (JSON, markdown table, PNG plots) and what they were measured on:
shared by the benchmark, the evaluations and the trainer's Pareto comparison. JSON and markdown
are replaced atomically, so a killed run never leaves half a file. The benchmark's and the
quality evaluation's own markdown and plots are the submodules bench and evaluation."""

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


def machine_stamp() -> dict[str, Any]:
    """What a result was measured on: CPU model, cores, native bf16, the engine's dtype, a GPU
    if torch sees one, and the code's commit. Written next to every table in docs/results."""
    import os
    import platform

    from vbon.cpu import default_dtype, has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "native_bf16": has_native_bf16(),
        "dtype": default_dtype(),
        "python": platform.python_version(),
        "commit": source_commit(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def source_commit() -> str | None:
    """The checkout's commit (short hash, '+changes' when files differ from it), so a results
    page says which code it measured; None outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              check=True)  # fmt: skip
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+changes" if dirty else head


def shown_path(path: str | Path) -> str:
    """A path as a results page shows it: relative to the checkout when inside it, so pages do
    not carry the measuring machine's folders."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def machine_line(machine: dict[str, Any]) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    bf16 = "native bf16" if machine.get("native_bf16") else "no native bf16"
    commit = f", code at commit {machine['commit']}" if machine.get("commit") else ""
    return (f"{machine['cpu']}, {machine['cores']} cores ({bf16}), engine dtype "
            f"{machine['dtype']}{gpu}{commit}")
