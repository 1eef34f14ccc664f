"""Training curves from the trainer's log history: curves.csv and curves.png (reward, log F-hat,
KL to the base per step)."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = {
    "step": "step",
    "elapsed_s": "elapsed_s",
    "cpu_s": "cpu_s",
    "raw_reward": "reward",
    "log_fhat": "log_fhat",
    "reward": "train_reward",  # what the optimiser saw (log F-hat, exact or raw)
    "kl_seq": "kl_seq",
    "kl": "kl_token",
    "token_kl": "sft_token_kl",  # --sft-kl-coef: per-token KL on the BoN-SFT batches
    "critic_var_ratio": "critic_var_ratio",  # --credit critic: advantage variance left
    "completions/mean_length": "completion_len",
    "loss": "loss",
    "grad_norm": "grad_norm",
    "learning_rate": "lr",
}


def rows_from_history(history: list[dict]) -> list[dict]:
    rows = []
    for e in history:
        if "step" not in e or ("loss" not in e and "reward" not in e):
            continue
        if "train_runtime" in e:  # the summary entry at the end
            continue
        rows.append({out: e.get(key, "") for key, out in COLUMNS.items()})
    # A resumed run may repeat steps logged before the kill: keep the last of each.
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def write_curves(history: list[dict], folder: Path) -> list[dict]:
    rows = rows_from_history(history)
    with (folder / "curves.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS.values()))
        w.writeheader()
        w.writerows(rows)
    plot_curves(rows, folder / "curves.png")
    return rows


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "reward (raw)"),
        ("log_fhat", "log F-hat"),
        ("kl_seq", "KL to base (nats)"),
    ]
    if not any(r.get("kl_seq") != "" for r in rows):
        panels = [("loss", "loss")]
        if any(r.get("sft_token_kl") != "" for r in rows):
            panels.append(("sft_token_kl", "KL to base per token"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        pts = [(r["step"], float(r[key])) for r in rows if r.get(key) not in ("", None)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, lw=0.8, alpha=0.5)
            k = max(1, len(ys) // 10)
            if len(ys) >= 3 * k and k > 1:
                smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
                          for i in range(len(ys))]
                ax.plot(xs, smooth, lw=1.6)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
