"""The paper's comparison on held-out prompts: reward against KL(pi || base) for the base model,
BoN-N (N = 2, 4, 8, 16, at its analytic KL bound), the vBoN adapters (the shipped ones by
default), KL-regularised RL at several KL weights and BoN-SFT. A markdown table (mean +- SE)
and a PNG Pareto plot, written by this command into docs/results/.

    python -m trainer.pareto                    # evaluate what exists, train what is missing
    python -m trainer.pareto --no-train         # only adapters that exist
    python -m trainer.pareto --record           # also store the pooled evaluation in each
                                                # vBoN adapter's vbon.json

Baselines are trained from their recipes (trainer/recipes/kl-rl-b*.yaml, bon-sft-n8.yaml) into
<work-dir>/adapters when missing, one `python -m trainer` after another (on 2 CPU cores: ~12
minutes per KL-RL adapter, ~8 for BoN-SFT; they reuse the vBoN recipes' reference samples when
<work-dir> is the work folder those ran in).

Each evaluation seed is an independent draw of everything sampled: one vLLM engine seeded with
it draws the base model's samples (16 per prompt: base reward = their mean, BoN-N = the mean of
the best of each of the 16/N groups) and each adapter's (`--samples` per prompt). KL(pi||base)
is the per-sequence sum of log pi - log pi_base over the adapter's samples, computed in fp32
with transformers (adapter on / off). The seeds are pooled per prompt; standard errors are
across prompts (the gain share's by bootstrap over prompts). Per-seed results are cached in
<work-dir>/eval, keyed by the adapter's weights, so a rerun evaluates only what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vbon.bon import kl_bound
from vbon.errors import ConfigError
from vbon.sampling import Sampling

logger = logging.getLogger("trainer.pareto")

BON_NS = (2, 4, 8, 16)
BASE_SAMPLES = max(BON_NS)  # per prompt and seed: one group of 16, 16/N groups of N
BASELINE_RECIPES = ("kl-rl-b0.05", "kl-rl-b0.1", "kl-rl-b0.2", "bon-sft-n8")
RESULT_STEM = "pareto"


@dataclass
class Entry:
    """One policy of the comparison: an adapter folder, what it is, the N it is compared to."""

    label: str
    kind: str  # vbon, kl-rl, bon-sft, checkpoint
    folder: Path
    n: int  # BoN-N whose gain its share is measured against
    beta: float | None = None


# --- what to compare -------------------------------------------------------------------------


def vbon_entries(folders: list[Path]) -> list[Entry]:
    from vbon.adapters import read_meta

    out = []
    for f in folders:
        meta = read_meta(f)
        if meta.method != "vbon" or not meta.n:
            raise ConfigError(f"--vbon '{f}': not a vBoN adapter (method {meta.method})")
        label = f"vBoN-{meta.n}"
        if any(e.label == label for e in out):  # two of one N (a method comparison)
            label = f"{label} ({f.name})"
        out.append(Entry(label, "vbon", f, meta.n, meta.beta))
    return sorted(out, key=lambda e: e.n)


def baseline_entries(adapters_dir: Path, recipes: list[str]) -> list[Entry]:
    from trainer.config import parse_config

    out = []
    for recipe in recipes:
        cfg = parse_config(["--recipe", recipe])
        folder = adapters_dir / cfg.adapter_name
        if cfg.method == "kl-rl":
            out.append(Entry(f"KL-RL β={cfg.beta:g}", "kl-rl", folder, 8, cfg.beta))
        else:
            out.append(Entry(f"BoN-SFT-{cfg.n}", "bon-sft", folder, cfg.n))
    return out


def checkpoint_entries(run_dir: Path, n: int) -> list[Entry]:
    """--curve RUN_DIR: the warm start (RL step 0) and the RL checkpoints a vBoN run kept."""
    from trainer.run_folder import CHECKPOINTS, WARM_START

    out = []
    if (run_dir / WARM_START / "adapter_config.json").is_file():
        out.append(Entry("step 0 (warm start)", "checkpoint", run_dir / WARM_START, n))
    for ck in sorted((run_dir / CHECKPOINTS).glob("checkpoint-*"),
                     key=lambda p: int(p.name.split("-")[-1])):
        if (ck / "adapter_config.json").is_file():
            out.append(Entry(f"step {ck.name.split('-')[-1]}", "checkpoint", ck, n))
    return out


def train_missing(entries: list[Entry], recipes: list[str], work_dir: Path) -> dict[str, float]:
    """Train each baseline whose adapter is missing, from its recipe; minutes per adapter."""
    minutes = {}
    for entry, recipe in zip(entries, recipes, strict=True):
        if (entry.folder / "adapter_model.safetensors").is_file():
            continue
        cmd = [sys.executable, "-m", "trainer", "--recipe", recipe, "--output", str(entry.folder),
               "--work-dir", str(work_dir), "--evaluate", "false", "--overwrite"]
        logger.info("training %s: %s", entry.label, " ".join(cmd))
        t0 = time.monotonic()
        subprocess.run(cmd, check=True)
        minutes[entry.label] = round((time.monotonic() - t0) / 60, 1)
        logger.info("trained %s in %.1f min", entry.label, minutes[entry.label])
    return minutes


# --- one seed --------------------------------------------------------------------------------


def _weights_key(folder: Path) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def evaluate_seed(
    seed: int,
    entries: list[Entry],
    *,
    model_path: str,
    openings: list[str],
    samples: int,
    sampling: Sampling,
    reward: Any,
    engine_settings: Any,
    cache_dir: Path,
) -> tuple[list[list[float]], dict[str, dict[str, Any]]]:
    """The base model's rewards per prompt (BASE_SAMPLES each) and, per entry label, its
    samples' rewards per prompt and per-sample KL, for one seed. Cached per (seed, weights)."""
    from trainer.reference import cached_reference, store_reference

    base_rows, base_path, base_key = cached_reference(
        cache_dir, model_path, openings, BASE_SAMPLES, sampling, reward, seed
    )
    ident = hashlib.sha256(json.dumps(
        [model_path, openings, samples, sampling.to_dict(), reward.describe()], sort_keys=True
    ).encode()).hexdigest()[:12]
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for e in entries:
        path = cache_dir / f"eval-{ident}-s{seed}-{_weights_key(e.folder)}.json"
        if path.is_file():
            results[e.label] = json.loads(path.read_text())
        else:
            todo.append((e, path))
    if base_rows is None or todo:
        drawn_base, drawn = _draw(seed, [e for e, _ in todo], model_path=model_path,
                                  openings=openings, samples=samples, sampling=sampling,
                                  engine_settings=engine_settings, need_base=base_rows is None)
        if base_rows is None:
            from trainer.reference import scored_rows

            base_rows = scored_rows(openings, drawn_base, reward)
            store_reference(base_path, base_key, base_rows)
        for (e, path), (texts, prompt_ids, comp_ids) in zip(todo, drawn, strict=True):
            res = _score_and_kl(e, texts, prompt_ids, comp_ids, openings, reward, model_path)
            from vbon.adapters import write_json_atomic

            write_json_atomic(path, res)
            results[e.label] = res
    return [row.rewards for row in base_rows], results


def _draw(
    seed: int, entries: list[Entry], *, model_path: str, openings: list[str], samples: int,
    sampling: Sampling, engine_settings: Any, need_base: bool,
) -> tuple[list[list[str]] | None, list[tuple[list[list[str]], list, list]]]:
    """One engine for the seed: the base samples (if needed), then each adapter's."""
    from vllm.lora.request import LoRARequest

    from trainer.reference import build_lora_llm, close_llm, prompt_progress, sample_with_vllm
    from vbon.prompts import render_task
    from vbon.sampling import vllm_params

    rank = max([_rank(e.folder) for e in entries] or [16])
    llm = build_lora_llm(engine_settings, model_path, rank, seed=seed)
    try:
        base = None
        if need_base:
            base = sample_with_vllm(llm, openings, BASE_SAMPLES, sampling,
                                    stage=f"seed {seed}: base model")
        tok = llm.get_tokenizer()
        texts = [render_task(tok, o) for o in openings]
        drawn = []
        for i, e in enumerate(entries, start=1):
            lora = LoRARequest(f"eval-{i}", i, str(e.folder.resolve()))
            outs = llm.generate(
                texts, vllm_params(sampling, n=samples), lora_request=lora,
                use_tqdm=prompt_progress(f"seed {seed}: {e.label} ({samples} per prompt)"),
            )  # fmt: skip
            drawn.append((
                [[c.text for c in o.outputs] for o in outs],
                [list(o.prompt_token_ids) for o in outs for _ in o.outputs],
                [list(c.token_ids) for o in outs for c in o.outputs],
            ))
    finally:
        close_llm(llm)
    return base, drawn


def _rank(folder: Path) -> int:
    return int(json.loads((folder / "adapter_config.json").read_text()).get("r", 16))


def _score_and_kl(
    e: Entry, texts: list[list[str]], prompt_ids: list, comp_ids: list, openings: list[str],
    reward: Any, model_path: str,
) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.reference import scored_rows
    from vbon.logprobs import completion_logprobs

    rewards = [row.rewards for row in scored_rows(openings, texts, reward)]
    tok = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(e.folder)).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lp = completion_logprobs(model, prompt_ids, comp_ids, pad_id=pad)
    lp_ref = completion_logprobs(model, prompt_ids, comp_ids, pad_id=pad, disable_adapter=True)
    kl = [a - b for a, b in zip(lp, lp_ref, strict=True)]
    per = len(texts[0]) if texts else 0
    return {
        "rewards": rewards,
        "kl": [kl[p * per : (p + 1) * per] for p in range(len(texts))],
        "texts": texts,
    }


# --- pooling and the report --------------------------------------------------------------------


def pooled(
    base: list[list[float]], trained: list[list[float]], kl: list[list[float]], n: int,
    texts: list[str], seed: int = 0,
) -> dict[str, Any]:
    """vbon.metrics.summarise over the seeds' samples pooled per prompt."""
    from vbon.metrics import summarise

    flat_kl = [k for per_prompt in kl for k in per_prompt]
    return summarise(base, trained, n, flat_kl, texts, seed=seed)


def bon_rows(base: list[list[float]]) -> list[dict[str, Any]]:
    """Base and BoN-N rewards (mean +- SE across prompts) from the pooled base samples; each
    seed's 16 samples split into 16/N groups of N."""
    from vbon.metrics import mean_se

    arr = [np.asarray(b, dtype=float) for b in base]
    rows = [{"label": "base", "kind": "base", "n": 1, "kl": 0.0, "kl_se": 0.0,
             **_ms("reward", mean_se([a.mean() for a in arr]))}]
    for n in BON_NS:
        per_prompt = [a.reshape(-1, n).max(axis=1).mean() for a in arr]
        rows.append({"label": f"BoN-{n}", "kind": "bon", "n": n, "kl": round(kl_bound(n), 4),
                     "kl_se": None, **_ms("reward", mean_se(per_prompt))})
    return rows


def _ms(key: str, m_se: tuple[float, float]) -> dict[str, float]:
    return {key: round(m_se[0], 4), f"{key}_se": round(m_se[1], 4)}


def frontier_at(points: list[tuple[float, float]], kl: float) -> float | None:
    """The upper frontier of (KL, reward) points, linearly interpolated at `kl`; None outside
    their KL range."""
    pts = sorted(points)
    hull: list[tuple[float, float]] = []
    for p in pts:  # keep only points no cheaper point beats
        if not hull or p[1] > hull[-1][1]:
            hull.append(p)
    for (k0, r0), (k1, r1) in zip(hull, hull[1:], strict=False):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else max(r0, r1)
    if hull and math.isclose(hull[0][0], kl):
        return hull[0][1]
    return None


def build_result(
    base: list[list[float]],
    per_entry: dict[str, tuple[Entry, list[list[float]], list[list[float]], list[str],
                               list[dict[str, Any]]]],
) -> dict[str, Any]:
    rows = bon_rows(base)
    bon = {r["n"]: r["reward"] for r in rows}
    for label, (e, rewards, kl, texts, per_seed) in per_entry.items():
        m = pooled(base, rewards, kl, e.n, texts)
        rows.append({
            "label": label, "kind": e.kind, "n": e.n, "beta": e.beta, "folder": str(e.folder),
            "reward": m["reward_trained"], "reward_se": m["reward_trained_se"],
            "kl": m["kl_to_base"], "kl_se": m["kl_to_base_se"],
            "share": m["gain_fraction_of_bon"], "share_se": m["gain_fraction_of_bon_se"],
            "share_of": f"BoN-{e.n}", "kl_bound": m["kl_bound_bon"],
            "win_rate": m["win_rate_vs_base"], "win_rate_se": m["win_rate_vs_base_se"],
            "distinct_2": m["distinct_2"], "per_seed": per_seed, "metrics": m,
        })
    klrl = [(r["kl"], r["reward"]) for r in rows if r["kind"] == "kl-rl"]
    for r in rows:
        if r["kind"] == "vbon":
            front = frontier_at(klrl, r["kl"])
            r["klrl_frontier_reward"] = None if front is None else round(front, 4)
            r["c"] = round(r["share"] / math.sqrt(r["kl"]), 3) if r["kl"] > 0 else None
    return {"rows": rows, "bon_rewards": bon}


def render_markdown(result: dict[str, Any]) -> str:
    from vbon.report import machine_line
    from vbon.table import fmt, markdown_table

    def pm(r: dict[str, Any], key: str, digits: int = 3) -> str:
        if r.get(key) is None:
            return "-"
        se = r.get(f"{key}_se")
        return fmt(r[key], digits) + (f" ± {fmt(se, digits)}" if se is not None else "")

    rows = [r for r in result["rows"] if r["kind"] != "checkpoint"]
    table = markdown_table(
        ["policy", "reward", "KL to base (nats)", "share of BoN-N's gain", "win rate vs base",
         "KL-RL frontier at this KL", "distinct-2"],
        [[r["label"], pm(r, "reward"),
          pm(r, "kl") if r["kind"] != "bon" else f"≤ {fmt(r['kl'], 3)} (bound)",
          (pm(r, "share") + f" (of {r['share_of']})") if r.get("share") is not None else "-",
          pm(r, "win_rate") if r.get("win_rate") is not None else "-",
          fmt(r.get("klrl_frontier_reward")) if r["kind"] == "vbon" else "",
          fmt(r.get("distinct_2")) if r.get("distinct_2") is not None else ""]
         for r in rows],
    )
    lines = [
        "# Reward against KL: base, BoN-N, vBoN, KL-RL, BoN-SFT",
        "",
        f"Written by `{result['command']}` on {result['date']}.  ",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Held-out prompts: {result['prompts']} (vbon/data/prompts_eval.jsonl); evaluation seeds "
        f"{result['seeds']} pooled (each seed draws the base samples, {BASE_SAMPLES} per prompt, "
        f"and {result['samples']} samples per prompt of each adapter anew); reward "
        f"`{result['reward']}`; {result['max_tokens']} new tokens, temperature 1, top-p 1. "
        "Mean ± SE across prompts; the share's SE by bootstrap over prompts. BoN-N's KL is "
        "the analytic bound log N − (N−1)/N (its exact KL is lower).",
        "",
        table,
        "",
        "![Pareto plot](pareto.png)",
        "",
    ]
    seeds = [r for r in rows if r.get("per_seed")]
    if seeds:
        lines += ["Per evaluation seed (share of BoN-N's gain; KL):", ""]
        lines.append(markdown_table(
            ["policy", *[f"seed {s}" for s in result["seeds"]]],
            [[r["label"], *[f"{fmt(p['share'], 3)}; {fmt(p['kl'], 3)}" for p in r["per_seed"]]]
             for r in seeds],
        ))
        lines.append("")
    curve = [r for r in result["rows"] if r["kind"] == "checkpoint"]
    if curve:
        lines += [f"Training curve of {result.get('curve_run')}: held-out share and KL by RL "
                  "step (same evaluation):", ""]
        lines.append(markdown_table(
            ["checkpoint", "share of BoN-N's gain", "KL to base", "c = share/√KL"],
            [[r["label"], pm(r, "share"), pm(r, "kl"),
              fmt(r["share"] / math.sqrt(r["kl"]) if r["kl"] > 0 else None)] for r in curve],
        ))
        lines.append("")
    if result.get("trained_minutes"):
        lines.append("Baselines trained by this run (minutes): " + ", ".join(
            f"{k} {v}" for k, v in result["trained_minutes"].items()) + ".")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"base": ("k", "o"), "bon": ("tab:blue", "s"), "vbon": ("tab:red", "*"),
              "kl-rl": ("tab:green", "^"), "bon-sft": ("tab:purple", "D"),
              "checkpoint": ("tab:orange", ".")}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    rows = result["rows"]
    bon = sorted([r for r in rows if r["kind"] in ("base", "bon")], key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in bon], [r["reward"] for r in bon], "--", color="tab:blue",
            alpha=0.5, label="BoN-N at its KL bound")
    klrl = sorted([r for r in rows if r["kind"] == "kl-rl"], key=lambda r: r["kl"])
    if klrl:
        ax.plot([r["kl"] for r in klrl], [r["reward"] for r in klrl], "-", color="tab:green",
                alpha=0.4)
    curve = [r for r in rows if r["kind"] == "checkpoint"]
    if curve:
        ax.plot([r["kl"] for r in curve], [r["reward"] for r in curve], ":", color="tab:orange",
                alpha=0.7)
    seen = set()
    for r in rows:
        color, marker = styles[r["kind"]]
        label = {"base": "base", "bon": "BoN-N", "vbon": "vBoN-N",
                 "kl-rl": "KL-RL (β sweep)", "bon-sft": "BoN-SFT",
                 "checkpoint": "vBoN-8 training steps"}[r["kind"]]
        ax.errorbar(r["kl"], r["reward"], xerr=r.get("kl_se") or None,
                    yerr=r.get("reward_se") or None, fmt=marker, color=color,
                    markersize=11 if r["kind"] == "vbon" else 7, capsize=2,
                    label=None if label in seen else label)
        seen.add(label)
        if r["kind"] != "checkpoint":
            ax.annotate(r["label"], (r["kl"], r["reward"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=7)
    ax.set_xlabel("KL(π ‖ base), nats (BoN-N: analytic bound)")
    ax.set_ylabel(f"mean reward ({result['reward']})")
    ax.set_title(f"Reward vs KL on {result['prompts']} held-out prompts, seeds {result['seeds']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / f"{RESULT_STEM}.png", dpi=120)
    plt.close(fig)
    return [f"{RESULT_STEM}.png"]


# --- the command -----------------------------------------------------------------------------


def record(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """--record: the pooled evaluation into each vBoN adapter's vbon.json `evaluation`."""
    from vbon.adapters import META_FILE, write_json_atomic

    for r in rows:
        if r["kind"] != "vbon":
            continue
        path = Path(r["folder"]) / META_FILE
        data = json.loads(path.read_text())
        m = r["metrics"]
        data.setdefault("metrics", {}).update(m)
        data["metrics"].update(
            eval_n=r["n"], eval_prompts=result["prompts"],
            eval_samples_per_prompt=result["samples"] * len(result["seeds"]),
            eval_seeds=result["seeds"], eval_command=result["command"], eval_date=result["date"],
            c=r["c"], klrl_frontier_reward=r["klrl_frontier_reward"],
        )
        write_json_atomic(path, data)
        logger.info("recorded the evaluation in %s", path)


def main(argv: list[str] | None = None) -> int:
    from trainer.jobspec import engine_settings_for
    from vbon.models import resolve_model
    from vbon.prompts import default_prompt_file, load_prompts
    from vbon.report import machine_stamp, write_report
    from vbon.rewards import load_reward
    from vbon.shipped import SHIPPED_DIR

    parser = argparse.ArgumentParser(prog="python -m trainer.pareto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vbon", nargs="*", type=Path, default=None,
                        help="vBoN adapter folders (default: the shipped ones, "
                        "vbon/data/adapters/*)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINE_RECIPES),
                        help="baseline recipes (trainer/recipes/<name>.yaml)")
    parser.add_argument("--curve", type=Path, default=None,
                        help="a vBoN run folder (<work-dir>/<name>): also evaluate its warm "
                        "start and RL checkpoints, for share and KL by training step")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="evaluation seeds, pooled (each an independent draw)")
    parser.add_argument("--samples", type=int, default=2,
                        help="samples per prompt and seed of each adapter")
    parser.add_argument("--eval-num-prompts", type=int, default=0, help="first K (0: all)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/pareto"),
                        help="baselines' training work folder (and its reference cache), "
                        "evaluation cache; trained baselines go to <work-dir>/adapters")
    parser.add_argument("--no-train", action="store_true",
                        help="skip baselines whose adapter is missing instead of training them")
    parser.add_argument("--out", type=Path, default=Path("docs/results"),
                        help="where pareto.md, pareto.png and pareto.json go")
    parser.add_argument("--record", action="store_true",
                        help="store each vBoN adapter's pooled evaluation in its vbon.json")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        folders = args.vbon if args.vbon is not None else sorted(
            p for p in SHIPPED_DIR.iterdir() if (p / "vbon.json").is_file()
        ) if SHIPPED_DIR.is_dir() else []
        entries = vbon_entries(folders)
        baselines = baseline_entries(args.work_dir / "adapters", args.baselines)
        model_path = resolve_model("embedded")
        openings = load_prompts(default_prompt_file("eval"))
        if args.eval_num_prompts:
            openings = openings[: args.eval_num_prompts]
        reward = load_reward("vader")
        if args.samples < 1:
            raise ConfigError("--samples must be >= 1")
        if args.curve and not (args.curve / "checkpoints").is_dir():
            raise ConfigError(f"--curve '{args.curve}': not a trainer run folder (no checkpoints/)")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    trained = {} if args.no_train else train_missing(baselines, args.baselines, args.work_dir)
    baselines = [e for e in baselines if (e.folder / "adapter_model.safetensors").is_file()]
    curve = checkpoint_entries(args.curve, 8) if args.curve else []
    entries = entries + baselines + curve
    sampling = Sampling()
    settings = engine_settings_for(model_path)
    base: list[list[float]] = [[] for _ in openings]
    acc: dict[str, Any] = {
        e.label: (e, [[] for _ in openings], [[] for _ in openings], [], []) for e in entries
    }
    for seed in args.seeds:
        seed_base, res = evaluate_seed(
            seed, entries, model_path=model_path, openings=openings, samples=args.samples,
            sampling=sampling, reward=reward, engine_settings=settings,
            cache_dir=args.work_dir / "eval",
        )
        for p, b in enumerate(seed_base):
            base[p].extend(b)
        for e in entries:
            r = res[e.label]
            _, rewards, kl, texts, per_seed = acc[e.label]
            for p in range(len(openings)):
                rewards[p].extend(r["rewards"][p])
                kl[p].extend(r["kl"][p])
                texts.extend(r["texts"][p])
            one = pooled(seed_base, r["rewards"], r["kl"], e.n,
                         [t for ts in r["texts"] for t in ts], seed=seed)
            per_seed.append({"seed": seed, "share": one["gain_fraction_of_bon"],
                             "kl": one["kl_to_base"], "reward": one["reward_trained"]})
    result = build_result(base, acc)
    result.update(
        command="python -m trainer.pareto " + " ".join(sys.argv[1:] if argv is None else argv),
        date=time.strftime("%Y-%m-%d"), machine=machine_stamp(), seeds=args.seeds,
        samples=args.samples, prompts=len(openings),
        reward=str(reward.describe().get("backend", "vader")), max_tokens=sampling.max_tokens,
        trained_minutes=trained, curve_run=str(args.curve) if args.curve else None,
        seconds=round(time.monotonic() - t0),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, RESULT_STEM, result, render_markdown, plot)
    if args.record:
        record(result["rows"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
