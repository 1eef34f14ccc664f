"""The quality evaluation's report (python -m vbon.evaluation): eval.md's table of reward, win
rate and KL per policy, and the reward / win rate vs KL plots with the Pareto frontier marked
(eval.json's pareto_* flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vbon.metrics import pareto_front
from vbon.report import shown_path
from vbon.table import markdown_table


def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def render_markdown(result: dict[str, Any]) -> str:
    """eval.md from the result eval.json holds."""
    cfg = result["config"]
    lines = [
        "# Quality evaluation: reward, win rate and KL to the base model",
        "",
        f"Command: `{result['command']}`  ",
        f"Model {result['model']} ({result['dtype']}), reward {result['reward'].get('backend')}"
        f", {result['prompts']} prompts from {shown_path(cfg['prompts'])}, "
        f"{cfg['max_tokens']} max tokens, "
        f"one sample per prompt and policy.  ",
        f"Date: {result['date']}"
        + (f"; machine: {result['machine']}" if "machine" in result else ""),
        "",
    ]
    rows = []
    for r in result["policies"]:
        kl = _f(r["kl"])
        if r["kind"] == "bon":
            kl = f"≤ {kl} (bound)"
        elif r["kl_se"] is not None and r["kind"] != "base":
            kl = f"{kl} ± {_f(r['kl_se'])}"
        wr = f"{_f(r['win_rate'])} ± {_f(r['win_rate_se'])}"
        if r.get("win_rate_bound") is not None:
            wr += f" (≤ {_f(r['win_rate_bound'])})"
        rows.append(
            [
                r["policy"],
                r["kind"],
                r["n"],
                _f(r["beta"]),
                f"{_f(r['mean_reward'])} ± {_f(r['reward_se'])}",
                wr,
                kl,
                _f(r["mean_tokens"], 1),
                "yes" if r["pareto_reward"] else "",
            ]
        )
    lines.append(
        markdown_table(
            [
                "policy",
                "kind",
                "N",
                "beta",
                "mean reward ± SE",
                "win rate vs base ± SE",
                "KL to base (nats)",
                "tokens",
                "Pareto",
            ],
            rows,
        )
    )
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """reward_vs_kl.png and winrate_vs_kl.png in `out`; their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["policies"] if r["kl"] is not None]
    files = []
    for key, se_key, label, fname in (
        ("mean_reward", "reward_se", "mean reward", "reward_vs_kl.png"),
        ("win_rate", "win_rate_se", "win rate vs a base sample", "winrate_vs_kl.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        bon = [r for r in rows if r["kind"] in ("base", "bon")]
        ax.errorbar(
            [r["kl"] for r in bon],
            [r[key] for r in bon],
            yerr=[r[se_key] or 0 for r in bon],
            marker="o",
            color="C0",
            label="base / BoN-N (KL at bound)",
            capsize=3,
        )
        for r in bon:
            ax.annotate(
                r["policy"],
                (r["kl"], r[key]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
        others = [r for r in rows if r["kind"] not in ("base", "bon")]
        for i, r in enumerate(others):
            ax.errorbar(
                [r["kl"]],
                [r[key]],
                xerr=[r["kl_se"] or 0],
                yerr=[r[se_key] or 0],
                marker="s",
                ls="none",
                color=f"C{(i % 8) + 1}",
                capsize=3,
                label=f"{r['policy']} ({r['kind']}, N={r['n']})",
            )
        pts = [(r["kl"], r[key]) for r in rows]
        front = pareto_front(pts)
        fx = [pts[i][0] for i in front]
        fy = [pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="k", ls="--", alpha=0.6, label="Pareto frontier")
        ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="k")
        if key == "win_rate":
            ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xlabel("KL to base (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{label} vs KL ({result['prompts']} prompts)")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files
