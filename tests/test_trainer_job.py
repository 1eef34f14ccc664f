"""The training job end to end on a tiny configuration (embedded model, reference samples from a
file, a few steps of a few tokens; no vLLM): a valid adapter whose LoRA weights moved, the
baselines, kill-and-resume, and bad input failing before any long work."""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from trainer.job import main
from trainer.sft_data import SFT_CHUNK
from vbon.adapters import validate_adapter
from vbon.sampling import Sampling

ROOT = Path(__file__).resolve().parent.parent
OPENINGS = ["The film was", "I rented this", "The acting is", "This sequel"]


def dataset_job(n: int = 2, seed: int = 0, batches: str = "shuffled") -> SimpleNamespace:
    """What the SFT dataset builders read of a Job: its config's N, seed and batch order, and
    the sampler's max tokens."""
    cfg = SimpleNamespace(n=n, seed=seed, sft_batches=batches)
    return SimpleNamespace(cfg=cfg, sampling=Sampling(max_tokens=16))


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the gateway's BoN log holds: prompts with 8 responses and their rewards."""
    rng = random.Random(0)
    words = ["good", "bad", "fine", "great", "awful", "okay", "superb", "dull"]
    path = tmp_path_factory.mktemp("ref") / "bon-log.jsonl"
    with path.open("w") as fh:
        for o in OPENINGS:
            responses = [" ".join(rng.choice(words) for _ in range(4)) for _ in range(8)]
            rewards = [rng.uniform(-1, 1) for _ in range(8)]
            fh.write(json.dumps({"prompt": o, "responses": responses, "rewards": rewards}) + "\n")
    return path


def tiny(ref: Path, tmp: Path, name: str = "vbon-tiny", *extra: str) -> list[str]:
    return [
        "--reference-from", str(ref),
        "--n", "4",
        "--m", "8",
        "--steps", "3",
        "--prompts-per-step", "2",
        "--completions-per-prompt", "2",
        "--max-tokens", "6",
        "--lora-rank", "4",
        "--evaluate", "false",
        "--checkpoint-every", "1",
        "--warm-start-epochs", "0",  # RL from the base; the warm start has its own test
        "--work-dir", str(tmp / "runs"),
        "--output", str(tmp / "adapters" / name),
        *extra,
    ]  # fmt: skip


def lora_b(folder: Path) -> dict[str, Any]:
    """The adapter's LoRA B matrices by name (float32)."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    b = {k: v.float() for k, v in weights.items() if "lora_B" in k}
    assert b, "no LoRA B matrices saved"
    return b


def lora_b_norm(folder: Path) -> float:
    return float(sum(t.norm() for t in lora_b(folder).values()))


def no_partial_folders(parent: Path) -> bool:
    if not parent.exists():
        return True
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_tiny_vbon_run_publishes_a_valid_trained_adapter(reference_file: Path, tmp_path: Path):
    assert main(tiny(reference_file, tmp_path)) == 0
    out = tmp_path / "adapters" / "vbon-tiny"
    meta = validate_adapter(out, max_rank=16)
    assert (meta.name, meta.method, meta.objective, meta.n, meta.m) == (
        "vbon-tiny",
        "vbon",
        "bound",
        4,
        8,
    )
    assert meta.beta == pytest.approx(1 / 3)
    assert meta.steps == 3 and meta.seed == 0 and meta.sampling["top_k"] == 0
    assert meta.versions["trl"] and meta.prompts_sha256
    # LoRA B starts at zero: a non-zero B means the weights moved from their initialisation.
    assert lora_b_norm(out) > 0
    curves = (out / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and len(curves) == 1 + 3
    assert "kl_seq" in curves[0] and "log_fhat" in curves[0]
    assert (out / "curves.png").stat().st_size > 0
    assert no_partial_folders(out.parent)


def test_baselines_and_exact_objective(reference_file: Path, tmp_path: Path, tiny_classifier: Path):
    # A classifier reward: VADER scores most 6-token texts 0, which leaves nothing to learn.
    assert (
        main(
            tiny(
                reference_file,
                tmp_path,
                "klrl",
                "--method",
                "kl-rl",
                "--beta",
                "0.1",
                "--steps",
                "2",
                "--reward",
                f"hf:{tiny_classifier}",
                "--rollouts",  # the other rollout path, end to end (the rest use vLLM)
                "transformers",
            )
        )
        == 0
    )
    meta = validate_adapter(tmp_path / "adapters" / "klrl")
    assert (meta.method, meta.beta, meta.objective) == ("kl-rl", 0.1, None)
    assert lora_b_norm(tmp_path / "adapters" / "klrl") > 0

    assert (
        main(
            tiny(reference_file, tmp_path, "sft", "--method", "bon-sft", "--sft-epochs", "1",
                 "--sft-kl-coef", "0.5")
        )
        == 0
    )
    meta = validate_adapter(tmp_path / "adapters" / "sft")
    assert meta.method == "bon-sft" and meta.n == 4 and meta.steps >= 1
    assert lora_b_norm(tmp_path / "adapters" / "sft") > 0
    with (tmp_path / "adapters" / "sft" / "curves.csv").open() as fh:
        kls = [float(r["sft_token_kl"]) for r in csv.DictReader(fh)]
    assert kls and all(k >= 0 for k in kls) and kls[-1] > 0  # the KL term ran and was logged

    assert (
        main(tiny(reference_file, tmp_path, "exact", "--objective", "exact", "--steps", "2")) == 0
    )
    meta = validate_adapter(tmp_path / "adapters" / "exact")
    assert meta.objective == "exact"


def test_warm_start_trains_then_rl_from_it(
    reference_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    args = tiny(
        reference_file, tmp_path, "warm", "--warm-start-epochs", "3", "--steps", "1",
        "--rl-prompts", "2",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert main(args) == 0
    # The default warm start; it trains on the first prompts, RL on the last --rl-prompts.
    assert "3 epochs of reference samples weighted by their BoN-4 win probability" in caplog.text
    assert f"on {len(OPENINGS) - 2} prompts (2 left for RL)" in caplog.text
    out = tmp_path / "adapters" / "warm"
    assert json.loads((out / "train_config.json").read_text())["rl_prompts"] == 2
    warm, final = lora_b(tmp_path / "runs" / "warm" / "warm-start"), lora_b(out)
    assert warm.keys() == final.keys()
    warm_norm = float(sum(v.norm() for v in warm.values()))
    moved = sum(float((final[k] - warm[k]).norm()) for k in warm)
    # SFT moved B away from zero; the one RL step then moved it a little from there (from
    # zero, one step could not reach the warm start's norm).
    assert warm_norm > 0 and 0 < moved < 0.5 * warm_norm
    # The KL is to the base model: at the first step the policy is the warm start, not the
    # reference (TRL, handed a PeftModel, would compare with a copy of it: exactly 0).
    with (out / "curves.csv").open() as fh:
        step1 = next(csv.DictReader(fh))
    assert abs(float(step1["kl_seq"])) > 1e-6
    assert validate_adapter(out).method == "vbon"
    assert not (tmp_path / "runs" / "warm" / "warm-start-checkpoints").exists()

    # --warm-start-from: another RL recipe from the same warm start, which it does not retrain.
    warm_dir = tmp_path / "runs" / "warm" / "warm-start"
    caplog.clear()
    reuse = tiny(
        reference_file, tmp_path, "reuse", "--warm-start-epochs", "3", "--steps", "1",
        "--rl-prompts", "2", "--warm-start-from", str(warm_dir), "--seed", "1",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert main(reuse) == 0
    assert f"warm start: taken from {warm_dir}" in caplog.text
    assert "epochs of" not in caplog.text
    assert not (tmp_path / "runs" / "reuse" / "warm-start").exists()
    again = lora_b(tmp_path / "adapters" / "reuse")
    moved = sum(float((again[k] - warm[k]).norm()) for k in warm)
    assert 0 < moved < 0.5 * warm_norm  # it started from the given warm start
    # A warm start of another LoRA layout is refused before any work.
    bad = [*tiny(reference_file, tmp_path, "bad", "--warm-start-epochs", "3",
                 "--warm-start-from", str(warm_dir))]
    bad[bad.index("--lora-rank") + 1] = "8"
    capsys.readouterr()
    assert main(bad) == 2
    assert "has r 4 (this run: 8)" in capsys.readouterr().err
    assert not (tmp_path / "adapters" / "bad").exists()


def test_critic_credit_fits_its_critic_and_trains(
    reference_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = tiny(
        reference_file, tmp_path, "critic", "--credit", "critic", "--critic-prompts", "2",
        "--steps", "2",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert main(args) == 0
    assert "critic: fitting on 2 prompts x 8 reference samples" in caplog.text
    assert (tmp_path / "runs" / "critic" / "critic.pt").is_file()  # --resume reuses it
    out = tmp_path / "adapters" / "critic"
    assert "critic_r2_heldout" in validate_adapter(out).metrics
    assert lora_b_norm(out) > 0
    # Each step logs how much of the advantage's variance over tokens the critic left.
    with (out / "curves.csv").open() as fh:
        ratios = [float(r["critic_var_ratio"]) for r in csv.DictReader(fh)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


@pytest.mark.parametrize(
    ("loss", "what", "batches"),
    [
        ("advantage", "advantage-weighted reference samples", "shuffled"),
        ("bon-sft", "BoN-4 SFT", "by-prompt"),
        (
            "bon-weighted",
            "reference samples weighted by their BoN-4 win probability",
            "prompt-chunks",
        ),
    ],
)
def test_other_warm_start_losses_train(
    reference_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    loss: str,
    what: str,
    batches: str,
) -> None:
    args = tiny(
        reference_file, tmp_path, "other", "--warm-start-epochs", "2", "--steps", "1",
        "--rl-prompts", "2", "--warm-start-loss", loss, "--sft-batches", batches,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert main(args) == 0
    assert f"2 epochs of {what} on 2 prompts" in caplog.text
    # by-prompt, prompt-chunks: the trainer reads the data in their own order.
    order = {"shuffled": "random", "by-prompt": "sequential", "prompt-chunks": "sequential"}[
        batches
    ]
    assert f"{order} order (--sft-batches {batches})" in caplog.text
    assert lora_b_norm(tmp_path / "runs" / "other" / "warm-start") > 0
    assert validate_adapter(tmp_path / "adapters" / "other").method == "vbon"


def test_advantage_dataset_weights_the_samples_above_the_mean(embedded_model: Path) -> None:
    """Weight = log F-hat(r) - the prompt's mean log F-hat, for the samples above the mean."""
    from transformers import AutoTokenizer

    from trainer.reference import ReferenceRow
    from trainer.sft_data import advantage_dataset
    from vbon.bon import log_cdf_hat

    tok = AutoTokenizer.from_pretrained(embedded_model)
    texts, rewards = [" Awful.", " Superb!", " Fine.", " Good."], [-0.5, 0.9, 0.1, 0.4]
    rows = [ReferenceRow("The film", texts, rewards)]
    data = advantage_dataset(dataset_job(), tok, rows, rounds=3)
    log_f = [log_cdf_hat(sorted(rewards), r) for r in rewards]
    advantage = {t: lf - sum(log_f) / 4 for t, lf in zip(texts, log_f, strict=True)}
    assert advantage[" Superb!"] > advantage[" Good."] > 0 > advantage[" Fine."]
    n_prompt = sum(1 for m in data[0]["completion_mask"] if m == 0)
    seen = []
    for ex in data:
        text = tok.decode(ex["input_ids"][n_prompt:]).removesuffix(tok.eos_token)
        assert ex["weight"] == pytest.approx(advantage[text])
        seen.append(text)
    assert sorted(seen) == sorted([" Superb!", " Good."] * 3)  # once per round


def test_bon_weighted_dataset_weights_by_win_probability(embedded_model: Path) -> None:
    """Weight = the sample's BoN-N win probability among the M, scaled to average 1 over the
    kept samples; samples under the floor are left out."""
    from transformers import AutoTokenizer

    from trainer.reference import ReferenceRow
    from trainer.sft_data import BON_WEIGHT_FLOOR, bon_weighted_dataset
    from vbon.bon import bon_win_probs

    tok = AutoTokenizer.from_pretrained(embedded_model)
    texts = [" Awful.", " Superb!", " Fine.", " Good.", " Bad.", " Nice."]
    rewards = [-0.5, 0.9, 0.1, 0.4, -0.3, 0.4]  # a tie: " Good." and " Nice."
    n = 4
    rows = [ReferenceRow("The film", texts, rewards)]
    data = bon_weighted_dataset(dataset_job(n), tok, rows, rounds=2)
    probs = dict(zip(texts, bon_win_probs(rewards, n), strict=True))
    kept = {t: p for t, p in probs.items() if p >= BON_WEIGHT_FLOOR}
    assert " Awful." not in kept and " Superb!" in kept  # (1/6)^4 is under the floor
    n_prompt = sum(1 for m in data[0]["completion_mask"] if m == 0)
    seen = []
    for ex in data:
        text = tok.decode(ex["input_ids"][n_prompt:]).removesuffix(tok.eos_token)
        assert ex["weight"] == pytest.approx(kept[text] * len(kept) / sum(kept.values()))
        seen.append(text)
    assert sorted(seen) == sorted(list(kept) * 2)  # once per round
    weights = {t: w for t, w in zip(seen, data["weight"], strict=True)}
    assert weights[" Superb!"] > weights[" Good."] == pytest.approx(weights[" Nice."])


def test_sft_data_keeps_each_prompts_examples_together(embedded_model: Path) -> None:
    """The warm start's data come in training order (the trainer reads them sequentially): a
    prompt's examples next to each other, so one batch shares the prompt's forward; each round
    holds every prompt once, in a seeded order that differs between rounds."""
    from transformers import AutoTokenizer

    from trainer.reference import ReferenceRow
    from trainer.sft_data import bon_sft_dataset, bon_weighted_dataset
    from vbon.prompts import render_task

    tok = AutoTokenizer.from_pretrained(embedded_model)
    openings = [f"Review {k}:" for k in range(12)]
    texts = [" Awful.", " Superb!", " Fine.", " Good.", " Bad.", " Nice."]
    rows = [ReferenceRow(o, texts, [-0.5, 0.9, 0.1, 0.4, -0.3, 0.2]) for o in openings]
    prompts = {tuple(tok(render_task(tok, o), add_special_tokens=False)["input_ids"]): o
               for o in openings}

    def prompt_order(data) -> list[str]:
        order = []
        for ex in data:
            n_prompt = ex["completion_mask"].index(1)
            opening = prompts[tuple(ex["input_ids"][:n_prompt])]
            if not order or order[-1] != opening:
                order.append(opening)
        return order

    for make, n in ((bon_weighted_dataset, 4), (bon_sft_dataset, 2)):
        orders = []
        for seed in (0, 0, 1):
            job = dataset_job(n, seed, "by-prompt")
            orders.append(prompt_order(make(job, tok, rows, rounds=2)))
        first = orders[0]
        assert len(first) == 2 * len(openings)  # one run of examples per prompt and round
        assert sorted(first[:12]) == sorted(first[12:]) == sorted(openings)
        assert first[:12] != first[12:] and first[:12] != openings  # shuffled, anew each round
        assert orders[1] == first and orders[2] != first  # seeded

    # prompt-chunks: BoN-4 keeps 5 of the 6 samples (the worst weighs < 1 %), in runs of 4 and
    # 1 of one prompt, the runs of all prompts in a seeded random order.
    data = bon_weighted_dataset(dataset_job(4, batches="prompt-chunks"), tok, rows, rounds=1)
    runs: list[tuple[str, int]] = []
    for ex in data:
        opening = prompts[tuple(ex["input_ids"][: ex["completion_mask"].index(1)])]
        if runs and runs[-1][0] == opening:
            runs[-1] = (opening, runs[-1][1] + 1)
        else:
            runs.append((opening, 1))
    assert len(data) == 5 * len(openings)
    assert {o: sum(k for p, k in runs if p == o) for o in openings} == dict.fromkeys(openings, 5)
    # Runs of 4 and 1 (two of one prompt may happen to meet: 5), not whole prompts.
    assert {size for _, size in runs} <= {1, SFT_CHUNK, 5} and len(runs) > len(openings)


def test_kill_and_resume(
    reference_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, figures
) -> None:
    args = tiny(reference_file, tmp_path, "vbon-resume", "--steps", "8")
    ckpt = tmp_path / "runs" / "vbon-resume" / "checkpoints"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not (ckpt / "checkpoint-2").is_dir():
            assert proc.poll() is None, "the run ended before its second checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.2)
        # Its rollout engine (vLLM's engine core and worker processes) must not outlive it.
        engine = psutil.Process(proc.pid).children(recursive=True)
        assert engine, "the run had no rollout engine processes"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(engine, timeout=60)
    assert not alive, f"orphaned engine processes: {[p.pid for p in alive]}"
    out = tmp_path / "adapters" / "vbon-resume"
    assert not out.exists() and no_partial_folders(out.parent)

    # A resume with other settings is refused before any work.
    assert main([*args, "--resume", "--learning-rate", "0.5"]) == 2
    assert "differ" in capsys.readouterr().err

    assert main([*args, "--resume"]) == 0
    meta = validate_adapter(out)
    assert meta.steps == 8
    steps = [int(line.split(",")[0]) for line in (out / "curves.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9))
    assert no_partial_folders(out.parent)
    figures.add(
        "trainer: SIGKILL, then --resume", faults=1, survived=1,
        note="8/8 steps, valid, no orphans",
    )  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing-prompts", "does not exist"),
        ("empty-prompts", "holds no prompts"),
        ("bad-model", "does not exist"),
        ("bad-reward", "unknown reward backend"),
        ("output-exists", "--overwrite"),
        ("resume-nothing", "no earlier run"),
        ("small-m", "must be >= --n"),
        ("short-reference", "fewer than 16"),
    ],
)
def test_bad_input_fails_fast_and_writes_nothing(
    case: str, needle: str, tmp_path: Path, reference_file: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "adapters" / "x"
    base = ["--work-dir", str(tmp_path / "runs"), "--output", str(out), "--evaluate", "false"]
    extra = {
        "missing-prompts": ["--prompts", str(tmp_path / "nope.jsonl")],
        "empty-prompts": ["--prompts", str(_write(tmp_path / "empty.jsonl", "\n"))],
        "bad-model": ["--model", str(tmp_path / "no-model")],
        "bad-reward": ["--reward", "sentiment-9000"],
        "output-exists": [],
        "resume-nothing": ["--resume"],
        "small-m": ["--n", "8", "--m", "4"],
        "short-reference": ["--reference-from", str(reference_file), "--n", "16", "--m", "16"],
    }[case]
    if case == "output-exists":
        out.mkdir(parents=True)
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err
    assert not (tmp_path / "runs").exists()
    assert out.exists() == (case == "output-exists")


def test_bon_sft_examples_end_like_the_samples_did(embedded_model: Path) -> None:
    """SFT data are the sampled tokens: EOS only after a sample that ended, none after one cut
    at max_tokens (TRL's default appends EOS to every completion), loss on the completion."""
    from transformers import AutoTokenizer

    from trainer.reference import ReferenceRow
    from trainer.sft_data import bon_sft_dataset
    from vbon.prompts import render_task

    tok = AutoTokenizer.from_pretrained(embedded_model)
    long = " It was great" * 20  # more than max_tokens: the sampler cut it
    job = dataset_job()
    rows = [ReferenceRow("The film", [" Bad.", " Fine!", long, " Meh."], [-0.5, 0.4, 0.9, 0.0])]
    data = bon_sft_dataset(job, tok, rows)
    assert len(data) == 2  # the best of each group of N = 2
    prompt_ids = tok(render_task(tok, "The film"), add_special_tokens=False)["input_ids"]
    short, cut = data[0], data[1]
    for ex in (short, cut):
        assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
        assert ex["completion_mask"] == [0] * len(prompt_ids) + [1] * (
            len(ex["input_ids"]) - len(prompt_ids)
        )
    assert tok.decode(short["input_ids"][len(prompt_ids) :]) == " Fine!" + tok.eos_token
    assert tok.eos_token_id not in cut["input_ids"][len(prompt_ids) :]
    assert tok.decode(cut["input_ids"][len(prompt_ids) :]) == long


def test_bon_sft_rounds_draw_bon_n_from_fresh_partitions(embedded_model: Path) -> None:
    """Each round after the first partitions a prompt's M samples anew, so over many rounds
    the k-th best sample wins as often as under BoN-N from those M: C(M-k, N-1) / C(M, N) per
    group. A fixed partition would repeat one round's winners (the 3rd best never, or always)."""
    from collections import Counter
    from math import comb

    from transformers import AutoTokenizer

    from trainer.reference import ReferenceRow
    from trainer.sft_data import bon_sft_dataset
    from vbon.prompts import render_task

    tok = AutoTokenizer.from_pretrained(embedded_model)
    texts = [" Awful.", " Superb!", " Fine.", " Good."]  # ranks 4, 1, 3, 2
    rows = [ReferenceRow("The film", texts, [-0.5, 0.9, 0.1, 0.4])]
    job = dataset_job()
    rounds = 600
    data = bon_sft_dataset(job, tok, rows, rounds=rounds)
    assert len(data) == 2 * rounds
    n_prompt = len(tok(render_task(tok, "The film"), add_special_tokens=False)["input_ids"])
    wins = Counter(tok.decode(ex["input_ids"][n_prompt:]).removesuffix(tok.eos_token)
                   for ex in data)
    assert wins[" Awful."] == 0
    assert wins[" Superb!"] == rounds  # the best sample wins its group in every partition
    for text, rank in ((" Good.", 2), (" Fine.", 3)):
        expected = 2 * rounds * comb(4 - rank, 1) / comb(4, 2)
        assert abs(wins[text] - expected) < 0.15 * expected, (text, wins[text], expected)
