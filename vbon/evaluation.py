"""`python -m vbon.evaluation` (also `python -m clients.eval`): quality of the base model, BoN
at several N and every installed adapter (vBoN and baselines) on the held-out prompts, as in
the paper. It samples on an offline engine in this process, not through the gateway.

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
off (vbon.logprobs, in fp32 like the trainer's KL). The engine's own log-probability of each
sample is compared with the teacher-forced one as a check (logprob_check_mean_abs). The base
has KL 0; BoN is placed at its analytic bound log N - (N-1)/N (its win rate is bounded by
N/(N+1)). The statistics are vbon.metrics', and an adapter's draw and KL (sample_adapter,
adapter_kl) are the ones the trainer's evaluation (trainer.evaluate) uses.

Output in --out: eval.json, eval.md, reward_vs_kl.png and winrate_vs_kl.png, written by
vbon.report.evaluation (Pareto frontier marked: no other policy has both lower KL and higher
reward / win rate).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vbon.cli import run_command
from vbon.metrics import mean_se, none_if_nan, pareto_front, win
from vbon.report import machine_line, machine_stamp, write_report
from vbon.report.evaluation import plot, render_markdown
from vbon.sampling import Sampling, vllm_params
from vbon.settings import CoreSettings

PROG = "python -m vbon.evaluation"


class EvalError(Exception):
    """A bad option: printed as one line, exit status 1."""


@dataclass
class AdapterSamples:
    """An adapter's completions of the prompts, `per_prompt` each, flattened prompt-major."""

    per_prompt: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    engine_logprobs: list[float | None]

    def by_prompt(self) -> list[list[str]]:
        k = self.per_prompt
        return [self.texts[i : i + k] for i in range(0, len(self.texts), k)]


def sample_adapter(
    llm: Any, texts: list[str], lora: Any, sampling: Sampling, per_prompt: int,
    use_tqdm: Any = False,
) -> AdapterSamples:
    """`per_prompt` completions of each rendered prompt from the adapter of `lora` (a vLLM
    LoRARequest), with the engine's log-probability of each: the draw both evaluations (this
    module's and the trainer's, trainer.evaluate) make of an adapter."""
    outs = llm.generate(texts, vllm_params(sampling, per_prompt, logprobs=0),
                        lora_request=lora, use_tqdm=use_tqdm)  # fmt: skip
    drawn = AdapterSamples(per_prompt, [], [], [], [])
    for out in outs:
        for c in sorted(out.outputs, key=lambda c: c.index):
            drawn.prompt_ids.append(list(out.prompt_token_ids))
            drawn.completion_ids.append(list(c.token_ids))
            drawn.texts.append(c.text)
            drawn.engine_logprobs.append(c.cumulative_logprob)
    return drawn


def adapter_kl(
    model_path: str, adapter_dir: Path, drawn: AdapterSamples, *, pad_id: int = 0,
    threads: int | None = None,
) -> tuple[list[float], list[float]]:
    """Per sample, the KL estimate sum_t log pi(y_t) - log pi_ref(y_t) (teacher-forced in fp32,
    adapter on vs off: vbon.logprobs) and log pi(y) itself, which the engine's own
    log-probability is checked against."""
    from vbon.logprobs import adapter_logprobs

    lp_pi, lp_ref = adapter_logprobs(
        model_path, adapter_dir, drawn.prompt_ids, drawn.completion_ids, pad_id=pad_id,
        threads=threads,
    )
    return [a - b for a, b in zip(lp_pi, lp_ref, strict=True)], lp_pi


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
    """One policy's line of eval.json; what is undefined (an SE over one prompt) is None."""
    m, se = mean_se(rewards)
    wr, wr_se = mean_se([win(a, b) for a, b in zip(rewards, ref, strict=True)])
    return {
        "policy": name,
        "kind": kind,
        "n": n,
        "beta": beta,
        "prompts": len(rewards),
        "mean_reward": none_if_nan(m),
        "reward_se": none_if_nan(se),
        "win_rate": none_if_nan(wr),
        "win_rate_se": none_if_nan(wr_se),
        "kl": none_if_nan(kl),
        "kl_se": none_if_nan(kl_se),
        "kl_kind": kl_kind,
        "mean_tokens": statistics.fmean(tokens) if tokens else None,
        **extra,
    }


def discover_adapters(
    folder: Path, max_rank: int, base_model: str, notes: list[str]
) -> list[tuple[Path, Any]]:
    """The adapters under `folder` that the engine can load for `base_model`; each one passed
    over gets a line in `notes`, which the report prints."""
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
    """Sample, score and estimate KL for every policy (see the module's docstring); `cfg` is
    resolve_config's, `progress` a tqdm bar advanced once per stage."""
    from vllm.lora.request import LoRARequest

    from vbon.bon import kl_bound, win_rate_bound
    from vbon.cpu import cpu_count
    from vbon.engine import build_llm, resolve_dtype
    from vbon.prompts import load_prompts, render_task

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

    for lora_id, (folder, meta) in enumerate(adapters, start=1):
        progress.set_description(f"adapter {folder.name}")
        lora = LoRARequest(folder.name, lora_id, str(folder.resolve()))
        drawn = sample_adapter(llm, texts, lora, s, 1)
        rewards = score(drawn.texts)
        kls, lp_pi = adapter_kl(model_path, folder, drawn, threads=cpu_count())
        kl, kl_se = mean_se(kls)
        check = [abs(a - b) for a, b in zip(lp_pi, drawn.engine_logprobs, strict=True)
                 if b is not None]  # fmt: skip
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
                [len(c) for c in drawn.completion_ids],
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


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
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
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default docs/results/eval; with --tiny runs/eval-<time>)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def resolve_config(a: argparse.Namespace) -> dict[str, Any]:

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
        "adapters_dir": a.adapters_dir or str(CoreSettings().adapters_dir),
        "seed": a.seed,
        "tiny": a.tiny,
    }


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command; `prog` is how it was invoked (clients.eval passes its own name), shown by
    --help and recorded as the report's command."""
    args = build_parser(prog).parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    return run_command(
        lambda: _main(args, [prog, *argv_list]),
        debug=args.debug,
        errors=(EvalError, ValueError, OSError),  # ConfigError is a ValueError
    )


def _main(args: argparse.Namespace, command: list[str]) -> int:
    from tqdm import tqdm

    cfg = resolve_config(args)
    # A real run is a result people compare (docs/results); a smoke run is not.
    smoke = f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or (smoke if args.tiny else "docs/results/eval"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_adapters = sum(1 for p in Path(cfg["adapters_dir"]).glob("*/vbon.json"))
    with tqdm(total=3 + n_adapters, unit="step", dynamic_ncols=True) as progress:
        result = evaluate(cfg, progress)
    rows = result["policies"]
    for key, flag in (("mean_reward", "pareto_reward"), ("win_rate", "pareto_win_rate")):
        front = set(pareto_front([(r["kl"], r[key]) for r in rows]))
        for i, r in enumerate(rows):
            r[flag] = i in front
    result = {
        "command": " ".join(command),
        "machine": machine_line(machine_stamp()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "duration_s": time.perf_counter() - t0,
        "config": cfg,
        **result,
    }
    write_report(out, "eval", result, render_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
