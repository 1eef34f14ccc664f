"""Trainer units: configuration checks, config files, the reward functions, the reference file
format and cache, the evaluation summary. No model is loaded here."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import pytest

from trainer.config import TrainConfig, build_parser, parse_config
from trainer.reference import ReferenceRow, read_reference_file, write_reference_file
from trainer.rewards import RewardFunction, VBoNReward
from vbon.bon import beta_for_n, kl_bound, log_cdf_hat
from vbon.errors import ConfigError
from vbon.metrics import summarise
from vbon.sampling import Sampling


def test_every_setting_has_help_and_a_flag() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert f.name in flags, f"{f.name} has no flag"


def test_defaults_are_vbon_8() -> None:
    cfg = parse_config([])
    assert (cfg.method, cfg.n, cfg.objective) == ("vbon", 8, "bound")
    assert cfg.kl_weight == pytest.approx(1 / 7)
    assert cfg.output_dir == Path("adapters/vbon-n8")
    assert cfg.kl_stop == pytest.approx(0.9 * kl_bound(8))
    assert cfg.warm_start_loss == "bon-weighted" and cfg.warm_start_epochs == 1.0
    assert cfg.num_prompts == 0 and cfg.eval_num_prompts == 0
    assert cfg.rl_prompts is None and cfg.sft_learning_rate == 1e-4  # rl_prompts: per run
    assert cfg.steps == 24  # RL steps after the warm start
    # Each warm-start loss has its own calibrated epochs and RL steps.
    sft = parse_config(["--warm-start-loss", "bon-sft"])
    assert (sft.warm_start_epochs, sft.steps) == (3.0, 6)
    assert parse_config(["--warm-start-loss", "bon-sft", "--steps", "9"]).steps == 9
    assert parse_config(["--warm-start-epochs", "0"]).steps == 128
    assert parse_config(["--method", "kl-rl", "--beta", "0.1"]).steps == 128
    assert parse_config(["--steps", "5"]).steps == 5
    # The warm start is vbon's default only: the baselines get none, and no error.
    assert parse_config(["--method", "kl-rl", "--beta", "0.1"]).warm_start_epochs == 0.0
    assert parse_config(["--method", "bon-sft"]).warm_start_epochs == 0.0


def test_rl_prompts_default_to_a_held_back_slice_of_the_training_prompts() -> None:
    from trainer.job import _rl_prompts

    assert _rl_prompts(parse_config([]), 600) == 96
    assert _rl_prompts(parse_config([]), 100) == 25  # at most a quarter
    assert _rl_prompts(parse_config([]), 12) == 0  # a quarter is under --prompts-per-step
    assert _rl_prompts(parse_config(["--warm-start-epochs", "0"]), 600) == 0
    assert _rl_prompts(parse_config(["--method", "bon-sft"]), 600) == 0
    assert _rl_prompts(parse_config(["--rl-prompts", "0"]), 600) == 0
    assert _rl_prompts(parse_config(["--rl-prompts", "10"]), 600) == 10
    for bad in ("2", "600"):  # fewer than a step's prompts; nothing left for the warm start
        with pytest.raises(ConfigError, match="change --rl-prompts"):
            _rl_prompts(parse_config(["--rl-prompts", bad]), 600)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--n", "1"], "--n must be >= 2"),
        (["--n", "8", "--m", "4"], "--m (4) must be >= --n (8)"),
        (["--method", "kl-rl"], "needs --beta"),
        (["--beta", "0.5"], "contradicts vBoN's 1/(N-1)"),
        (["--completions-per-prompt", "1"], "leaves one out"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--output", "adapters/bad name"], "adapter name"),
        (["--warm-start-epochs", "-1"], "--warm-start-epochs must be >= 0"),
        (["--sft-learning-rate", "0"], "--sft-learning-rate must be > 0"),
        (["--sft-kl-coef", "-1"], "--sft-kl-coef must be >= 0"),
        (["--rl-prompts", "-1"], "--rl-prompts must be >= 0"),
        (["--rl-prompts", "8", "--warm-start-epochs", "0"], "needs --method vbon and --warm"),
        (["--method", "kl-rl", "--beta", "0.1", "--warm-start-epochs", "1"], "vbon only"),
        (["--warm-start-from", "w", "--warm-start-epochs", "0"], "replaces vbon's warm start"),
        (["--method", "bon-sft", "--warm-start-from", "w"], "needs --method vbon"),
        (["--adam-beta1", "1"], "--adam-beta1 must lie in [0, 1)"),
    ],
)
def test_bad_settings_say_how_to_fix(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert needle in str(err.value)


def test_optimizer_settings_reach_both_stages() -> None:
    from trainer.policy import training_arguments

    cfg = parse_config(["--adam-beta1", "0.98", "--max-grad-norm", "0.5"])
    args = training_arguments(cfg, 1e-4)
    assert (args["adam_beta1"], args["max_grad_norm"], args["learning_rate"]) == (0.98, 0.5, 1e-4)
    assert training_arguments(parse_config([]), 5e-5)["adam_beta1"] == 0.98


def test_warm_start_loss_is_checked(tmp_path: Path) -> None:
    assert parse_config([]).warm_start_loss == "bon-weighted"
    # Each loss has its dataset, log name, default epochs and RL steps.
    from trainer.config import VBON_WARM_RL_STEPS, VBON_WARM_START_EPOCHS, WARM_START_LOSSES
    from trainer.sft_data import WARM_START_DATA

    assert set(WARM_START_DATA) == set(WARM_START_LOSSES) == set(VBON_WARM_START_EPOCHS)
    assert set(VBON_WARM_RL_STEPS) == set(WARM_START_LOSSES)
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"warm_start_loss": "dpo"}))  # files skip argparse's choices
    with pytest.raises(ConfigError, match="--warm-start-loss must be one of bon-sft, advantage"):
        parse_config(["--config", str(bad)])
    assert parse_config([]).sft_batches == "prompt-chunks"
    bad.write_text(json.dumps({"sft_batches": "sorted"}))
    must = "--sft-batches must be one of prompt-chunks, shuffled, by-prompt"
    with pytest.raises(ConfigError, match=must):
        parse_config(["--config", str(bad)])


def test_kl_penalty_defaults_to_sequence_and_is_checked(tmp_path: Path) -> None:
    assert parse_config([]).kl_penalty == "sequence"
    assert parse_config(["--kl-penalty", "token"]).kl_penalty == "token"
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"kl_penalty": "reward"}))  # files skip argparse's choices
    with pytest.raises(ConfigError, match="--kl-penalty must be one of sequence, token"):
        parse_config(["--config", str(bad)])


def test_config_file_then_flags(tmp_path: Path) -> None:
    yml = tmp_path / "recipe.yaml"
    yml.write_text("n: 4\nm: 32\nlearning-rate: 0.001\nsteps: 7\n")
    cfg = parse_config(["--config", str(yml), "--steps", "9"])
    assert (cfg.n, cfg.m, cfg.learning_rate, cfg.steps) == (4, 32, 0.001, 9)
    assert cfg.kl_weight == pytest.approx(beta_for_n(4))
    js = tmp_path / "recipe.json"
    js.write_text(json.dumps({"method": "kl-rl", "beta": 0.05}))
    cfg = parse_config(["--config", str(js)])
    assert cfg.method == "kl-rl" and cfg.kl_weight == 0.05 and cfg.kl_stop is None
    assert cfg.adapter_name == "kl-rl-b0.05"


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nn: 4\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_bool_flags() -> None:
    assert parse_config(["--overwrite"]).overwrite is True
    assert parse_config(["--evaluate", "false"]).evaluate is False


class FakeReward:
    name = "fake"

    def score(self, prompts, completions):
        return [float(len(c)) for c in completions]

    def describe(self):
        return {"backend": "fake"}


def test_vbon_reward_is_log_fhat_of_the_raw_reward() -> None:
    logged: dict[str, float] = {}
    fn = VBoNReward(FakeReward(), n=8)
    refs = sorted([1.0, 2.0, 3.0, 3.0, 5.0])
    out = fn(
        prompts=["p"] * 3,
        completions=["a", "abc", "abcdefgh"],
        opening=["o"] * 3,
        ref_rewards=[refs] * 3,
        log_metric=lambda k, v: logged.__setitem__(k, v),
    )
    assert out == [log_cdf_hat(refs, r) for r in (1.0, 3.0, 8.0)]
    # mid-rank ties: the one ref equal to 1.0 counts half, so F-hat = (0 + 1/2 + 1) / 6
    assert out[0] == pytest.approx(math.log(1.5 / 6))
    assert out[1] == pytest.approx(math.log((2 + 2 / 2 + 1) / 6))
    assert out[2] == pytest.approx(0.0)
    assert logged["raw_reward"] == pytest.approx(4.0)
    assert RewardFunction(FakeReward())(prompts=["p"], completions=["ab"], opening=["o"]) == [2.0]


def test_exact_objective_tends_to_the_bound_for_unlikely_completions() -> None:
    n = 8
    refs = [0.0, 1.0, 2.0, 3.0]
    for log_p, close in ((-60.0, True), (-0.01, False)):
        fn = VBoNReward(
            FakeReward(), n=n, objective="exact", ref_logprob=lambda p, c, lp=log_p: [lp] * len(p)
        )
        (exact,) = fn(
            prompts=["p"],
            completions=["ab"],
            opening=["o"],
            ref_rewards=[refs],
            completion_ids=[[1, 2]],
        )
        bound = log_cdf_hat(refs, 2.0) + math.log(n) / (n - 1)
        assert (abs(exact - bound) < 1e-9) is close


def test_reference_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "ref.jsonl"
    rows = [ReferenceRow("a", ["x", "y"], [0.5, -0.1]), ReferenceRow("b", ["z", "w"], [0.0, 1.0])]
    write_reference_file(path, rows)
    back = read_reference_file(path, min_samples=2)
    assert [r.prompt for r in back] == ["a", "b"] and back[0].sorted_rewards == [-0.1, 0.5]
    with pytest.raises(ConfigError, match="fewer than 3"):
        read_reference_file(path, min_samples=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "rewards": ["x"]}\n')
    with pytest.raises(ConfigError, match="finite numbers"):
        read_reference_file(bad, min_samples=1)
    with pytest.raises(ConfigError, match="does not exist"):
        read_reference_file(tmp_path / "none.jsonl", min_samples=1)


def test_reference_cache_is_keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.reference as ref

    calls: list[int] = []

    def fake_compute(*, openings, m, **kw):
        calls.append(m)
        return [ReferenceRow(o, ["r"] * m, [float(i) for i in range(m)]) for o in openings]

    monkeypatch.setattr(ref, "compute_reference", fake_compute)
    model = tmp_path / "model"
    model.mkdir()
    kw = dict(
        cache_dir=tmp_path / "cache",
        model_path=str(model),
        reward=FakeReward(),
        engine_settings=None,
        sampling=Sampling(),
    )
    rows, path = ref.load_or_compute_reference(openings=["a", "b"], m=4, **kw)
    again, path2 = ref.load_or_compute_reference(openings=["a", "b"], m=4, **kw)
    assert (
        calls == [4] and path == path2 and [r.rewards for r in again] == [r.rewards for r in rows]
    )
    ref.load_or_compute_reference(openings=["a", "b"], m=5, **kw)
    ref.load_or_compute_reference(openings=["a", "c"], m=4, **kw)
    kw["sampling"] = Sampling(max_tokens=7)
    ref.load_or_compute_reference(openings=["a", "b"], m=4, **kw)
    # Another --seed is another draw: replicates must not share their reference samples.
    ref.load_or_compute_reference(openings=["a", "b"], m=4, seed=1, **kw)
    assert calls == [4, 5, 4, 4, 4]


def test_evaluation_summary() -> None:
    base = [[0.0, 0.1, 0.2, 0.9], [0.0, 0.0, 0.5, 0.1]]  # n=2, two groups per prompt
    trained = [[0.6, 0.4], [0.3, 0.3]]
    m = summarise(base, trained, n=2, kl=[0.5, 0.7, 0.6, 0.6], trained_texts=["a b c", "a b"])
    assert m["reward_base"] == pytest.approx((0.3 + 0.15) / 2, abs=1e-4)
    assert m["reward_bon2"] == pytest.approx(((0.1 + 0.9) / 2 + (0.0 + 0.5) / 2) / 2, abs=1e-4)
    assert m["reward_trained"] == pytest.approx(0.4, abs=1e-4)
    assert m["kl_to_base"] == pytest.approx(0.6)
    expected = (0.4 - 0.225) / (0.375 - 0.225)
    assert m["gain_fraction_of_bon"] == pytest.approx(expected, abs=1e-3)
