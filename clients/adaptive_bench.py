"""`python -m clients.adaptive_bench`: adaptive best-of-N (early exit, pruning) against plain
BoN, through the gateway, side by side in one run.

For each completion length (--lengths, default 32 and 128 tokens):
1. **Candidates.** Every prompt gets one seeded `/v1/bon` request with n = 32 and its
   candidates. Candidate i is the sample seeded seed + i, so plain BoN-N with the same seed
   is the best of the first N of them: mean reward (± SE over prompts) and generated tokens per
   answer of BoN-1..32 come from these, with no second draw.
2. **Partial-vs-final rank correlation.** Each candidate's prefix at each checkpoint (its text
   re-tokenized locally and cut at c tokens) is scored with the same reward; within a prompt,
   the Spearman correlation of prefix and final rewards; mean ± SE over prompts.
3. **Replay** (`--select`): a grid of adaptive settings replayed offline on those candidates,
   taking the decisions the gateway takes. Run on the training prompts, this is how the default
   setting is chosen: the fewest tokens among settings at or above BoN-16's mean reward.
4. **Live adaptive runs.** Each setting (--settings) through the gateway with the same seeds:
   mean reward, generated tokens per answer (the response's usage) and, paired per prompt,
   the difference to BoN-16.
5. **Throughput and latency.** Closed loop for each method with about --samples-in-flight
   samples in flight (concurrency = that / the samples a request runs at once), for
   --level-s seconds: answers/s at saturation and p50 latency; and p50 latency alone (c = 1).

Writes adaptive.json, adaptive.md and adaptive.png into --out (default docs/results/adaptive),
or selection.* with --select.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clients.bench import percentile
from clients.client import AsyncClient, RetryPolicy
from clients.errors import VBoNClientError
from vbon.adapters import write_json_atomic
from vbon.bon import mid_rank
from vbon.metrics import mean_se
from vbon.report import machine_line, machine_stamp, write_report
from vbon.table import markdown_table

BON_NS = (1, 2, 4, 8, 16, 32)
SETTING_RE = re.compile(r"^(n(?P<n>\d+))?(:?w(?P<w>\d+))?(:?t(?P<t>-?[\d.]+))?"
                        r"(:?p(?P<p>[\d,]+):k(?P<k>[\d.]+))?$")
CHECKPOINTS = {32: (4, 8, 16, 24), 128: (4, 8, 16, 32, 64, 96)}


class BenchError(VBoNClientError):
    pass


# -- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """An adaptive setting: 'default' (the server's), or e.g. 'n16:w4:t0.9:p32:k0.5'."""

    name: str
    n: int = 16
    wave: int | None = None
    target: float | None = None
    at_tokens: tuple[int, ...] = ()
    keep: float | None = None

    @classmethod
    def parse(cls, text: str) -> Setting:
        if text == "default":
            return cls("default")
        m = SETTING_RE.match(text)
        if not m or not text:
            raise ValueError(
                f"setting {text!r}: use 'default' or n<N>:w<wave>:t<target>:p<c1,c2>:k<keep>, "
                "e.g. n16:w4:t0.9:p32:k0.5 (each part optional)"
            )
        g = m.groupdict()
        return cls(
            text,
            int(g["n"] or 16),
            int(g["w"]) if g["w"] else None,
            float(g["t"]) if g["t"] else None,
            tuple(int(x) for x in g["p"].split(",")) if g["p"] else (),
            float(g["k"]) if g["k"] else None,
        )

    def fields(self) -> dict[str, Any]:
        if self.name == "default":
            return {"adaptive": True}
        out: dict[str, Any] = {}
        if self.wave is not None:
            out["wave"] = self.wave
        if self.target is not None:
            out["stop_at_reward"] = self.target
        if self.at_tokens:
            out["prune"] = {"at_tokens": list(self.at_tokens), "keep": self.keep or 0.5}
        return out

    def live_samples(self, default_wave: int) -> int:
        """Samples one request runs at once (for the closed loop's concurrency)."""
        if self.target is None and self.name != "default":
            return self.n
        return min(self.n, self.wave or default_wave)


def grid() -> list[Setting]:
    """What --select replays: early exit (n, wave, target), with and without pruning, and
    pruning alone. n = 32 lets hard prompts draw past 16 what easy ones save."""
    out = []
    for n in (16, 32):
        for w in (2, 4):
            for t in (0.8, 0.85, 0.9, 0.95):
                for prune in ("", ":p32:k0.5", ":p16:k0.5", ":p64:k0.5"):
                    out.append(Setting.parse(f"n{n}:w{w}:t{t}{prune}"))
    for prune in ("p16,32:k0.5", "p16,32,64:k0.5", "p32,64:k0.5"):
        out += [Setting.parse(f"n16:{prune}"), Setting.parse(f"n32:{prune}")]
    # Finer targets where the coarse grid crosses BoN-16 at 128 tokens.
    for w in (2, 4):
        for t in (0.86, 0.87, 0.88):
            for prune in ("", ":p24:k0.5", ":p32:k0.5", ":p48:k0.5"):
                out.append(Setting.parse(f"n32:w{w}:t{t}{prune}"))
    return out


# -- statistics ------------------------------------------------------------------------------
def spearman(a: list[float], b: list[float]) -> float | None:
    # Mid-ranks for ties, the convention of F-hat (vbon.bon.mid_rank; its constant offset of
    # 1/2 does not change a correlation).
    def ranks(v: list[float]) -> list[float]:
        s = sorted(v)
        return [mid_rank(s, x) for x in v]

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True)) / math.sqrt(va * vb)


# -- replay ----------------------------------------------------------------------------------
@dataclass
class Cand:
    text: str
    reward: float
    tokens: int
    prefix_reward: dict[int, float]  # checkpoint -> reward of the first c tokens


def replay(cands: list[Cand], s: Setting, default: Setting) -> tuple[float, int]:
    """(reward of the answer, tokens generated) for one prompt, deciding as the gateway does.
    A pruned candidate is counted at its checkpoint (the gateway's abort lands a few tokens
    later, so live runs cost slightly more)."""
    wave = s.wave or (default.wave if s.target is not None else None) or s.n
    tokens = 0
    best: tuple[float, int] | None = None
    for start in range(0, s.n, wave):
        idx = list(range(start, min(s.n, start + wave)))
        running = set(idx)
        spent = {i: cands[i].tokens for i in idx}
        for cp in s.at_tokens:
            part = [i for i in sorted(running) if cands[i].tokens >= cp]
            if len(part) < 2:
                continue
            keep = max(1, math.ceil((s.keep or 0.5) * len(part) - 1e-9))
            ranked = sorted(part, key=lambda i: (-cands[i].prefix_reward[cp], i))
            for i in ranked[keep:]:
                running.discard(i)
                spent[i] = cp
        tokens += sum(spent.values())
        for i in sorted(running):
            if best is None or cands[i].reward > best[0]:
                best = (cands[i].reward, i)
        if s.target is not None and any(cands[i].reward >= s.target for i in running):
            break
    assert best is not None
    return best[0], tokens


def fits(s: Setting, length: int) -> bool:
    return s.name == "default" or all(c < length for c in s.at_tokens)


# -- gateway phases --------------------------------------------------------------------------
async def draw_candidates(
    client: AsyncClient, messages: list[list[dict[str, str]]], length: int, seed: int,
    concurrency: int, progress: Any,
) -> list[list[dict[str, Any]]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(p: int) -> list[dict[str, Any]]:
        async with sem:
            r = await client.bon(messages=messages[p], n=32, max_tokens=length,
                                 seed=seed + 1000 * p, return_candidates=True)
        progress(1)
        assert r.candidates is not None
        return [c.model_dump() for c in sorted(r.candidates, key=lambda c: c.index)]

    return list(await asyncio.gather(*(one(p) for p in range(len(messages)))))


async def live_setting(
    client: AsyncClient, messages: list[list[dict[str, str]]], length: int, seed: int,
    s: Setting, concurrency: int, progress: Any,
) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(p: int) -> dict[str, Any]:
        async with sem:
            r = await client.bon(messages=messages[p], n=s.n, max_tokens=length,
                                 seed=seed + 1000 * p, adaptive=s.fields())
        progress(1)
        ad = r.adaptive
        return {"reward": r.reward, "tokens": r.usage.completion_tokens,
                "samples": ad.samples if ad else s.n, "pruned": ad.pruned if ad else 0,
                "stop_reason": ad.stop_reason if ad else None}

    return list(await asyncio.gather(*(one(p) for p in range(len(messages)))))


async def closed_loop(
    client: AsyncClient, messages: list[list[dict[str, str]]], length: int, n: int,
    fields: dict[str, Any] | None, concurrency: int, seconds: float, max_requests: int,
) -> dict[str, Any]:
    lat: list[float] = []
    tokens = 0
    i = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    last = t0

    async def worker() -> None:
        nonlocal i, tokens, last
        while time.perf_counter() < deadline and i < max_requests:
            p = i
            i += 1
            t = time.perf_counter()
            r = await client.bon(messages=messages[p % len(messages)], n=n, max_tokens=length,
                                 adaptive=fields)
            last = time.perf_counter()
            lat.append(last - t)
            tokens += r.usage.completion_tokens

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = max(last - t0, 1e-9)
    return {"concurrency": concurrency, "answers": len(lat), "wall_s": wall,
            "answers_per_s": len(lat) / wall, "gen_tokens_per_s": tokens / wall,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95)}


# -- one length ------------------------------------------------------------------------------
def prefix_rewards(
    rows: list[list[dict[str, Any]]], prompts: list[str], checkpoints: tuple[int, ...],
    tokenizer: Any, reward: Any,
) -> list[list[Cand]]:
    out = []
    for opening, cands in zip(prompts, rows, strict=True):
        ids = [tokenizer.encode(c["text"], add_special_tokens=False) for c in cands]
        pre: dict[int, list[float]] = {}
        for cp in checkpoints:
            texts = [tokenizer.decode(x[:cp], skip_special_tokens=True) for x in ids]
            pre[cp] = reward.score([opening] * len(texts), texts)
        out.append([
            Cand(c["text"], c["reward"], c["tokens"], {cp: pre[cp][i] for cp in checkpoints})
            for i, c in enumerate(cands)
        ])
    return out


def bon_rows(cands: list[list[Cand]]) -> list[dict[str, Any]]:
    rows = []
    for n in BON_NS:
        rewards = [max(c.reward for c in cs[:n]) for cs in cands]
        tokens = [sum(c.tokens for c in cs[:n]) for cs in cands]
        m, se = mean_se(rewards)
        rows.append({"method": f"BoN-{n}", "n": n, "reward": m, "reward_se": se,
                     "tokens": statistics.fmean(tokens), "per_prompt": rewards,
                     "per_prompt_tokens": tokens})
    return rows


def correlations(cands: list[list[Cand]], checkpoints: tuple[int, ...]) -> list[dict[str, Any]]:
    out = []
    for cp in checkpoints:
        rs = [r for cs in cands
              if (r := spearman([c.prefix_reward[cp] for c in cs], [c.reward for c in cs]))
              is not None]
        m, se = mean_se(rs)
        out.append({"tokens": cp, "spearman": m, "se": se, "prompts": len(rs)})
    return out


def replay_rows(
    cands: list[list[Cand]], settings: list[Setting], default: Setting, bon16: list[float],
) -> list[dict[str, Any]]:
    rows = []
    for s in settings:
        res = [replay(cs, s, default) for cs in cands]
        rewards = [r for r, _ in res]
        m, se = mean_se(rewards)
        diff = mean_se([a - b for a, b in zip(rewards, bon16, strict=True)])
        rows.append({"setting": s.name, "reward": m, "reward_se": se, "diff": diff[0],
                     "diff_se": diff[1], "tokens": statistics.fmean(t for _, t in res)})
    return rows


async def run_length(
    client: AsyncClient, cfg: dict[str, Any], prompts: list[str], length: int,
    settings: list[Setting], default: Setting, tokenizer: Any, reward: Any, log: Any,
) -> dict[str, Any]:
    from vbon.prompts import task_messages

    messages = [task_messages(p) for p in prompts]
    seed = cfg["seed"]
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if done[0] % 10 == 0:
            log(f"  {length} tokens: {done[0]} requests")

    # Candidates are kept in the work dir: a rerun (another grid, a crash) does not redraw them.
    cache = Path(cfg["work_dir"]) / (
        f"candidates-{cfg['prompts']}-{len(prompts)}-L{length}-s{seed}.json"
    )
    if cache.is_file():
        raw = json.loads(cache.read_text())
        log(f"{length} tokens: candidates from {cache}")
    else:
        log(f"{length} tokens: drawing 32 candidates for {len(prompts)} prompts")
        raw = await draw_candidates(client, messages, length, seed, 4, tick)
        write_json_atomic(cache, raw)
    # A request's checkpoints must lie below max_tokens (the gateway refuses others), so such
    # settings are left out at this length; the server's default drops what does not fit.
    settings = [s for s in settings if fits(s, length)]
    candidates = [*grid(), default] if cfg["select"] else settings
    candidates = [s for s in candidates if fits(s, length)]
    cps = tuple(sorted({c for c in CHECKPOINTS.get(length, (8, 16, 32)) if c < length}
                       | {c for s in [*candidates, default] for c in s.at_tokens if c < length}))
    cands = prefix_rewards(raw, [m[0]["content"] for m in messages], cps, tokenizer, reward)
    bon = bon_rows(cands)
    bon16 = next(r for r in bon if r["n"] == 16)
    result: dict[str, Any] = {"length": length, "bon": bon,
                              "correlation": correlations(cands, cps)}
    short_default = replace(default, at_tokens=tuple(c for c in default.at_tokens if c < length))
    result["replay"] = replay_rows(
        cands, [short_default if s.name == "default" else s for s in candidates], short_default,
        bon16["per_prompt"],
    )
    if cfg["select"]:
        return result
    live = []
    for s in settings:
        log(f"{length} tokens: live {s.name}")
        outs = await live_setting(client, messages, length, seed, s, 8, tick)
        rewards = [o["reward"] for o in outs]
        m, se = mean_se(rewards)
        d = mean_se([a - b for a, b in zip(rewards, bon16["per_prompt"], strict=True)])
        tok = [o["tokens"] for o in outs]
        live.append({"setting": s.name, "n": s.n, "reward": m, "reward_se": se,
                     "diff": d[0], "diff_se": d[1], "tokens": statistics.fmean(tok),
                     "tokens_se": mean_se([float(t) for t in tok])[1],
                     "samples": statistics.fmean(o["samples"] for o in outs),
                     "pruned": statistics.fmean(o["pruned"] for o in outs),
                     "target_reached": sum(o["stop_reason"] == "target_reached" for o in outs)
                     / len(outs),
                     "tokens_vs_bon16": statistics.fmean(tok) / bon16["tokens"]})
    result["live"] = live
    # Throughput and latency, every method under the same rule.
    methods: list[tuple[str, int, dict[str, Any] | None, int]] = [
        (f"BoN-{n}", n, None, n) for n in BON_NS
    ] + [(s.name, s.n, s.fields(), s.live_samples(default.wave or 4)) for s in settings]
    speed = []
    for name, n, fields, live_samples in methods:
        c = max(1, math.ceil(cfg["samples_in_flight"] / live_samples))
        log(f"{length} tokens: closed loop {name} c={c}")
        await closed_loop(client, messages, length, n, fields, min(c, 4), 5, min(c, 4))
        sat = await closed_loop(client, messages, length, n, fields, c, cfg["level_s"], 10**6)
        alone = await closed_loop(client, messages[::-1], length, n, fields, 1,
                                  cfg["level_s"], cfg["alone_requests"])
        speed.append({"method": name, "n": n, "saturation": sat,
                      "alone_latency_p50_s": alone["latency_p50_s"],
                      "alone_requests": alone["answers"]})
    result["speed"] = speed
    return result


# -- report ----------------------------------------------------------------------------------
def _f(v: float | None, d: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def verdict(res: dict[str, Any]) -> dict[str, Any] | None:
    """The bar: the default setting at BoN-16's mean reward (within one SE, paired) at <= 50 %
    of its tokens and >= 1.6x its answers/s."""
    live = next((r for r in res.get("live", []) if r["setting"] == "default"), None)
    speed = {s["method"]: s for s in res.get("speed", [])}
    if live is None or "default" not in speed or "BoN-16" not in speed:
        return None
    ratio = (speed["default"]["saturation"]["answers_per_s"]
             / speed["BoN-16"]["saturation"]["answers_per_s"])
    return {
        "reward_ok": live["diff"] >= -live["diff_se"],
        "tokens_ratio": live["tokens_vs_bon16"],
        "answers_per_s_ratio": ratio,
        "passes": live["diff"] >= -live["diff_se"] and live["tokens_vs_bon16"] <= 0.5
        and ratio >= 1.6,
    }


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Adaptive best-of-N against plain BoN" if not result["config"]["select"]
        else "# Choosing the default adaptive setting (replay on the training prompts)",
        "",
        f"`{result['command']}` — {result['date']}, {result['duration_s'] / 60:.0f} min; "
        f"{machine_line(result['machine'])}; {result['config']['prompts']} "
        f"({result['config']['n_prompts']} prompts, seed {result['config']['seed']}); "
        f"`default` = `{{\"n\": {result['config']['default_n']}, \"adaptive\": true}}` "
        f"(model `bon-{result['config']['default_n']}-adaptive`) with the server's default "
        f"setting `{json.dumps(result['server_default'])}`.",
        "",
        "Reward: mean over prompts ± SE. BoN-N rows are the best of each prompt's first N "
        "seeded candidates (what `/v1/bon` with that seed returns). Δ BoN-16: paired "
        "difference per prompt ± SE. Tokens: generated per answer.",
    ]
    for res in result["lengths"]:
        L = res["length"]
        lines += ["", f"## {L}-token completions", ""]
        speed = {s["method"]: s for s in res.get("speed", [])}

        def sp(name: str, speed: dict[str, Any] = speed) -> list[str]:
            s = speed.get(name)
            if s is None:
                return ["-", "-", "-"]
            return [_f(s["saturation"]["answers_per_s"], 2),
                    _f(s["saturation"]["latency_p50_s"], 2), _f(s["alone_latency_p50_s"], 2)]

        rows = []
        for r in res["bon"]:
            rows.append([r["method"], f"{_f(r['reward'])} ± {_f(r['reward_se'])}", "-",
                         _f(r["tokens"], 0), "-", *sp(r["method"])])
        for r in res.get("live", []):
            rows.append([f"adaptive `{r['setting']}`", f"{_f(r['reward'])} ± {_f(r['reward_se'])}",
                         f"{r['diff']:+.3f} ± {_f(r['diff_se'])}",
                         f"{r['tokens']:.0f} ({100 * r['tokens_vs_bon16']:.0f} % of BoN-16)",
                         f"{r['samples']:.1f} / {r['pruned']:.1f} / "
                         f"{100 * r['target_reached']:.0f} %",
                         *sp(r["setting"])])
        if rows and "speed" in res:
            lines += [markdown_table(
                ["method", "reward", "Δ BoN-16", "tokens/answer",
                 "samples / pruned / target hit", "answers/s (saturation)",
                 "p50 s (saturation)", "p50 s (alone)"], rows), ""]
        elif rows:
            lines += [markdown_table(["method", "reward", "tokens/answer"],
                                     [[r[0], r[1], r[3]] for r in rows]), ""]
        v = verdict(res)
        if v is not None:
            lines += [
                f"**Bar** (default setting vs BoN-16): reward within one SE: "
                f"{'yes' if v['reward_ok'] else 'no'}; tokens {100 * v['tokens_ratio']:.0f} % "
                f"(≤ 50 %); answers/s ×{v['answers_per_s_ratio']:.2f} (≥ 1.6): "
                f"**{'met' if v['passes'] else 'not met'}**.", ""]
        lines += ["Partial-vs-final reward, within-prompt Spearman rank correlation:", "",
                  markdown_table(["prefix tokens", "spearman", "prompts"],
                                 [[c["tokens"], f"{_f(c['spearman'], 2)} ± {_f(c['se'], 2)}",
                                   c["prompts"]] for c in res["correlation"]]), ""]
        rep = sorted(res["replay"], key=lambda r: r["tokens"])
        title = ("Replayed settings (offline decisions on the same candidates; pruned ones "
                 "counted at their checkpoint):")
        lines += [title, "", markdown_table(
            ["setting", "reward", "Δ BoN-16", "tokens/answer"],
            [[r["setting"], f"{_f(r['reward'])} ± {_f(r['reward_se'])}",
              f"{r['diff']:+.3f} ± {_f(r['diff_se'])}", _f(r["tokens"], 0)] for r in rep]), ""]
        if result["config"]["select"]:
            bon16 = next(r for r in res["bon"] if r["n"] == 16)
            within = [r for r in rep if r["diff"] >= -r["diff_se"]]
            above = [r for r in rep if r["diff"] >= 0]
            lines += [
                f"BoN-16: {_f(bon16['reward'])} with {bon16['tokens']:.0f} tokens. Fewest "
                f"tokens within one SE of it (paired): "
                f"**{within[0]['setting'] if within else '-'}**; at or above it: "
                f"**{above[0]['setting'] if above else '-'}**.", ""]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = result["lengths"]
    live = not result["config"]["select"]
    cols = 3 if live else 2
    fig, axes = plt.subplots(len(lengths), cols, figsize=(5 * cols, 4 * len(lengths)),
                             squeeze=False)
    for row, res in zip(axes, lengths, strict=True):
        L = res["length"]
        ax = row[0]
        b = res["bon"]
        ax.errorbar([r["tokens"] for r in b], [r["reward"] for r in b],
                    yerr=[r["reward_se"] for r in b], marker="o", label="BoN-N", capsize=2)
        for r in b:
            ax.annotate(str(r["n"]), (r["tokens"], r["reward"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
        if live:
            for i, r in enumerate(res.get("live") or []):
                ax.errorbar([r["tokens"]], [r["reward"]], yerr=[r["reward_se"]], marker="s",
                            ls="none", color=f"C{(i % 8) + 1}", capsize=2, label=r["setting"])
        else:  # the replayed grid in grey, the default in red
            grid_pts = [r for r in res["replay"] if r["setting"] != "default"]
            ax.scatter([r["tokens"] for r in grid_pts], [r["reward"] for r in grid_pts],
                       s=12, color="0.6", label="replayed settings")
            for r in res["replay"]:
                if r["setting"] == "default":
                    ax.errorbar([r["tokens"]], [r["reward"]], yerr=[r["reward_se"]],
                                marker="s", color="C3", capsize=2, label="default")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens per answer")
        ax.set_ylabel("mean reward ± SE")
        ax.set_title(f"{L} tokens: reward vs tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if live:
            ax = row[1]
            sp = {s["method"]: s for s in res["speed"]}
            xs = [sp[r["method"]]["saturation"]["answers_per_s"] for r in b]
            ax.plot(xs, [r["reward"] for r in b], marker="o", color="C0", label="BoN-N")
            for r, x in zip(b, xs, strict=True):
                ax.annotate(str(r["n"]), (x, r["reward"]), fontsize=7,
                            textcoords="offset points", xytext=(3, -9))
            for i, r in enumerate(res["live"]):  # same colours as the left panel
                x = sp[r["setting"]]["saturation"]["answers_per_s"]
                ax.scatter([x], [r["reward"]], marker="s", color=f"C{(i % 8) + 1}",
                           label=r["setting"], zorder=3)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.legend(fontsize=7)
            ax.set_xlabel("answers/s at saturation")
            ax.set_ylabel("mean reward")
            ax.set_title(f"{L} tokens: reward vs throughput")
            ax.grid(alpha=0.3)
        ax = row[-1]
        c = res["correlation"]
        ax.errorbar([x["tokens"] for x in c], [x["spearman"] for x in c],
                    yerr=[x["se"] for x in c], marker="o", capsize=2)
        ax.set_xlabel("prefix tokens")
        ax.set_ylabel("Spearman(prefix reward, final reward)")
        ax.set_ylim(-0.1, 1.0)
        ax.set_title(f"{L} tokens: how early the reward judges")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    name = "adaptive.png" if live else "selection.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return [name]


# -- main ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clients.adaptive_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running gateway (default: start one on loopback)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prompts", default="eval",
                   help="'eval' (held-out, default), 'train', or a JSONL prompt file")
    p.add_argument("--n-prompts", type=int, default=100, help="prompts used (default 100)")
    p.add_argument("--lengths", default="32,128", help="completion lengths (default 32,128)")
    p.add_argument("--settings", default="default,n16:w2:t0.9,n16:w4:t0.9,n16:p16,32:k0.5",
                   help="adaptive settings, comma-free list separated by ';' or ',' between "
                   "settings that start with n: e.g. 'default;n16:w4:t0.9:p32:k0.5'")
    p.add_argument("--select", action="store_true",
                   help="replay a grid of settings (no live runs): how the default is chosen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-n", type=int, default=32,
                   help="n of the 'default' setting (adaptive: true), i.e. bon-<n>-adaptive")
    p.add_argument("--samples-in-flight", type=int, default=64,
                   help="closed loop: concurrency = this / samples a request runs at once")
    p.add_argument("--level-s", type=float, default=40.0, help="seconds per closed-loop level")
    p.add_argument("--alone-requests", type=int, default=6, help="requests at concurrency 1")
    p.add_argument("--out", default=None, help="default docs/results/adaptive")
    p.add_argument("--work-dir", default="runs/adaptive-bench",
                   help="the started gateway's log and adapters folder")
    return p


def parse_settings(text: str) -> list[Setting]:
    parts = [x for x in re.split(r";|,(?=n\d|default)", text) if x.strip()]
    return [Setting.parse(x.strip()) for x in parts]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(_main(args, argv))
    except (VBoNClientError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _main(args: argparse.Namespace, argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from vbon.prompts import default_prompt_file, load_prompts
    from vbon.settings import CoreSettings

    settings = parse_settings(args.settings)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    path = (default_prompt_file(args.prompts) if args.prompts in ("eval", "train")
            else Path(args.prompts))
    prompts = load_prompts(path)[: args.n_prompts]
    out = Path(args.out or "docs/results/adaptive")
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    core = CoreSettings()
    tokenizer = AutoTokenizer.from_pretrained(core.resolved_model())
    reward = core.load_reward()
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", file=sys.stderr, flush=True)

    server = None
    url = args.url
    if url is None:
        from clients.launch import LocalServer

        work = Path(args.work_dir)
        env = {"VBON_MAX_N": "32", "VBON_MAX_TOKENS_LIMIT": str(max(512, *lengths)),
               "VBON_MAX_SAMPLES_IN_FLIGHT": "4096", "VBON_REQUEST_TIMEOUT_S": "1800",
               "VBON_SHIPPED_ADAPTERS": "false", "VBON_ADAPTERS_DIR": str(work / "adapters")}
        server = LocalServer(env, work / "server.log")
        log("starting the gateway")
        server.start()
        url = server.url
    cfg = {"prompts": str(path) if args.prompts not in ("eval", "train") else args.prompts,
           "n_prompts": len(prompts), "lengths": lengths, "seed": args.seed,
           "settings": [s.name for s in settings], "select": args.select,
           "samples_in_flight": args.samples_in_flight, "level_s": args.level_s,
           "alone_requests": args.alone_requests, "work_dir": args.work_dir,
           "default_n": args.default_n}
    try:
        async with AsyncClient(url, api_key=args.api_key, timeout=1800,
                               retry=RetryPolicy(max_retries=8, backoff_s=0.5, max_wait_s=10),
                               max_connections=512) as client:
            ready = await client.ready()
            if not ready.ready:
                raise BenchError(f"the gateway at {url} is not ready: {ready.reason}")
            # The server's default setting, as its /v1/bon reports it.
            probe = await client.bon("The movie", n=4, max_tokens=max(lengths), adaptive=True)
            assert probe.adaptive is not None
            default = Setting("default", args.default_n, probe.adaptive.wave_size,
                              probe.adaptive.target,
                              tuple((probe.adaptive.prune or {}).get("at_tokens", [])),
                              (probe.adaptive.prune or {}).get("keep"))
            default_desc = {"wave": probe.adaptive.wave_size, "stop_at_reward":
                            probe.adaptive.target, "prune": probe.adaptive.prune}
            settings = [default if s.name == "default" else s for s in settings]
            results: list[dict[str, Any]] = []
            for L in lengths:
                results.append(await run_length(client, cfg, prompts, L, settings, default,
                                                tokenizer, reward, log))
                # Written after each length, so a failure later keeps what was measured.
                result = {"command": " ".join(["python -m clients.adaptive_bench", *argv]),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          "duration_s": time.perf_counter() - t0, "config": cfg,
                          "machine": machine_stamp(), "server_default": default_desc,
                          "lengths": results}
                write_report(out, "selection" if args.select else "adaptive", result,
                             render_markdown, plot)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
