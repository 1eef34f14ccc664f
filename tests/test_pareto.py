"""The Pareto comparison (trainer.pareto): its pooling and frontier on synthetic numbers, and the
whole command on the real engine (two seeds, a few prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.pareto import Entry, bon_rows, build_result, frontier_at, plot, render_markdown


def test_frontier_interpolates_the_upper_hull() -> None:
    pts = [(0.5, 0.3), (1.0, 0.5), (0.8, 0.2), (2.0, 0.6)]  # (0.8, 0.2) is dominated
    assert frontier_at(pts, 0.75) == pytest.approx(0.4)
    assert frontier_at(pts, 1.5) == pytest.approx(0.55)
    assert frontier_at(pts, 0.4) is None and frontier_at(pts, 2.5) is None
    assert frontier_at([], 1.0) is None


def test_bon_rows_split_each_seeds_16_into_groups() -> None:
    base = [[float(i) for i in range(16)] * 2]  # one prompt, two seeds of 16
    rows = {r["label"]: r for r in bon_rows(base)}
    assert rows["base"]["reward"] == pytest.approx(7.5)
    assert rows["BoN-16"]["reward"] == pytest.approx(15.0)
    assert rows["BoN-8"]["reward"] == pytest.approx((7 + 15) / 2)
    assert rows["BoN-2"]["kl"] == pytest.approx(0.1931, abs=1e-4)


def test_result_table_and_plot(tmp_path: Path) -> None:
    base = [[0.0, 1.0] * 8, [0.2, 0.4] * 8, [0.0, 0.5] * 8]
    halfway = [[0.75, 0.75], [0.35, 0.35], [0.375, 0.375]]  # half of BoN-8's gain, each prompt
    kl = [[1.0, 1.0]] * 3
    per = {"vBoN-8": (Entry("vBoN-8", "vbon", tmp_path, 8), halfway, kl, ["a b c"] * 6,
                      [{"seed": 0, "share": 0.5, "kl": 1.0, "reward": 0.49}]),
           "KL-RL β=0.1": (Entry("KL-RL β=0.1", "kl-rl", tmp_path, 8, 0.1), halfway,
                           [[0.5, 0.5]] * 3, ["x y"] * 6, []),
           "KL-RL β=0.05": (Entry("KL-RL β=0.05", "kl-rl", tmp_path, 8, 0.05),
                            [[0.9, 0.9], [0.4, 0.4], [0.5, 0.5]], [[2.0, 2.0]] * 3, ["x"] * 6,
                            [])}
    result = build_result(base, per)
    v = next(r for r in result["rows"] if r["label"] == "vBoN-8")
    assert v["share"] == pytest.approx(0.5) and v["kl"] == pytest.approx(1.0)
    assert v["c"] == pytest.approx(0.5)
    assert v["klrl_frontier_reward"] is not None and v["klrl_frontier_reward"] > v["reward"]
    result.update(command="python -m trainer.pareto", date="2026-12-05", seeds=[0],
                  samples=2, prompts=3, reward="vader", max_tokens=32, trained_minutes={},
                  machine={"cpu": "x", "cores": 2, "native_bf16": False, "dtype": "float32"})
    md = render_markdown(result)
    assert "| vBoN-8 |" in md and "0.500 ± " in md and "pareto.png" in md
    assert plot(result, tmp_path) == ["pareto.png"] and (tmp_path / "pareto.png").stat().st_size


@pytest.mark.engine
def test_the_command_on_the_real_engine(tmp_path: Path, embedded_model: Path) -> None:
    from tests.adapters_util import make_peft_adapter
    from trainer.pareto import main

    adapter = make_peft_adapter(embedded_model, tmp_path / "vbon-n4", n=4, seed=1)
    args = ["--vbon", str(adapter), "--baselines", "--seeds", "0", "1", "--samples", "1",
            "--eval-num-prompts", "2", "--work-dir", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--record"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    assert "vBoN-4" in (tmp_path / "out" / "pareto.md").read_text()
    row = next(r for r in result["rows"] if r["label"] == "vBoN-4")
    assert [s["seed"] for s in row["per_seed"]] == [0, 1] and row["kl"] > 0
    # Each seed drew its own base samples (the cache holds one file per seed, and they differ).
    draws = sorted((tmp_path / "work" / "eval").glob("reference-*.jsonl"))
    assert len(draws) == 2 and draws[0].read_text() != draws[1].read_text()
    meta = json.loads((adapter / "vbon.json").read_text())
    assert meta["metrics"]["eval_seeds"] == [0, 1] and meta["metrics"]["eval_n"] == 4
    assert main([*args[:-1]]) == 0  # a rerun reads every evaluation from the cache
