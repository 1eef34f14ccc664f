"""`python -m clients`: talk to a running gateway from the shell.

    python -m clients bon "The movie was" -n 8 --show-candidates
    python -m clients vbon "The movie was" --stream
    python -m clients chat "Say hi" --model bon-4
    python -m clients models | ready | health

The text is a movie-review opening by default (the task the adapters are trained on, sent as
the same chat turn the trainer uses); `--as chat` sends it as a plain user message and
`--as raw` as raw text to continue. Errors print one line and exit non-zero (--debug: traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clients.client import Client, RetryPolicy, default_url
from clients.errors import APIError, VBoNClientError
from vbon.table import fmt, text_table

EXIT_ERROR = 1
EXIT_USAGE = 2


def prompt_args(text: str, mode: str) -> dict[str, Any]:
    if mode == "raw":
        return {"prompt": text}
    if mode == "chat":
        return {"messages": [{"role": "user", "content": text}]}
    from vbon.prompts import task_messages

    return {"messages": task_messages(text)}


def sampling_args(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "seed": a.seed,
        "stop": a.stop,
    }


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--url", default=None, help=f"gateway URL (env VBON_URL; {default_url()})")
    g.add_argument("--api-key", default=None, help="bearer key (env VBON_API_KEY)")
    g.add_argument("--admin-key", default=None, help="admin key (env VBON_ADMIN_KEY)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    g.add_argument("--retries", type=int, default=3, help="retries on 429/503")
    g.add_argument("--json", action="store_true", help="print the raw JSON answer")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _prompt_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="movie-review opening (or chat message / raw text, see --as)")
    p.add_argument(
        "--as",
        dest="mode",
        choices=("task", "chat", "raw"),
        default="task",
        help="task: the review-continuation chat turn (default); chat: a user message; "
        "raw: text to continue",
    )
    g = p.add_argument_group("sampling (server defaults when omitted)")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clients",
        description="Client of the vbon gateway (BoN and vBoN serving).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="command")

    p = sub.add_parser("bon", help="best of N base-model samples by reward")
    _prompt_opts(p)
    p.add_argument("-n", type=int, default=8, help="N (default 8)")
    p.add_argument("--show-candidates", action="store_true", help="table of all N candidates")
    p.add_argument(
        "--adaptive", action="store_true",
        help="adaptive BoN with the server's default setting (options below override it)",
    )
    p.add_argument("--stop-at-reward", type=float, help="early exit: stop at this reward")
    p.add_argument("--stop-at-quantile", type=float, help="early exit: target as a quantile")
    p.add_argument("--wave", type=int, help="candidates per wave (with a target)")
    p.add_argument("--prune-at", help="pruning checkpoints in tokens, e.g. 16,32")
    p.add_argument("--keep", type=float, default=0.5, help="fraction kept at a checkpoint")
    _common(p)

    p = sub.add_parser("vbon", help="one sample from a vBoN adapter")
    _prompt_opts(p)
    p.add_argument("--adapter", help="adapter name (default: the server's default)")
    p.add_argument("-n", type=int, default=None, help="pick the adapter trained for this N")
    p.add_argument("--no-score", action="store_true", help="do not score the sample")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _common(p)

    for name, helptext in (
        ("complete", "OpenAI /v1/completions"),
        ("chat", "OpenAI /v1/chat/completions"),
    ):
        p = sub.add_parser(name, help=helptext)
        _prompt_opts(p)
        p.add_argument("--model", required=True, help="base model, bon, bon-<N>, vbon, adapter")
        p.add_argument("--best-of", type=int, help="draw this many, return the best by reward")
        p.add_argument("--choices", type=int, default=None, help="OpenAI n: choices returned")
        _common(p)

    for name, helptext in (
        ("models", "list served models (/v1/models)"),
        ("ready", "engine, reward model and adapters (/ready)"),
        ("health", "is the process alive (/health)"),
        ("reload", "install new adapters now (/admin/adapters/reload, admin key)"),
    ):
        p = sub.add_parser(name, help=helptext)
        _common(p)
    return parser


def _print_json(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(exclude_none=True)
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def adaptive_args(a: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "adaptive": a.adaptive or None,
        "stop_at_reward": a.stop_at_reward,
        "stop_at_quantile": a.stop_at_quantile,
        "wave": a.wave,
    }
    if a.prune_at:
        try:
            at = [int(t) for t in a.prune_at.split(",") if t.strip()]
        except ValueError:
            msg = f"--prune-at takes token counts like 16,32, got {a.prune_at!r}"
            raise SystemExit(msg) from None
        fields["prune"] = {"at_tokens": at, "keep": a.keep}
    return {k: v for k, v in fields.items() if v is not None}


def cmd_bon(c: Client, a: argparse.Namespace) -> int:
    r = c.bon(
        **prompt_args(a.text, a.mode),
        n=a.n,
        return_candidates=a.show_candidates,
        adaptive=adaptive_args(a) or None,
        **sampling_args(a),
    )
    if a.json:
        _print_json(r)
        return 0
    print(r.text.strip())
    print()
    if r.adaptive is not None:
        ad = r.adaptive
        print(
            f"adaptive best of at most N={r.n} (candidate {r.index}, seed {fmt(r.seed)}): "
            f"reward {r.reward:.3f}; {ad.stop_reason} after {ad.samples} samples in "
            f"{ad.waves} wave(s), {ad.pruned} pruned"
        )
    else:
        print(
            f"best of N={r.n} (candidate {r.index}, seed {fmt(r.seed)}): reward {r.reward:.3f}, "
            f"KL(BoN||base) <= {fmt(r.kl_bound)} nats"
        )
    print(
        f"tokens: {r.usage.prompt_tokens} prompt + {r.usage.completion_tokens} completion "
        f"(all samples); time {r.timings.total_s:.2f} s (generation "
        f"{r.timings.generation_s:.2f} s, scoring {r.timings.scoring_s * 1000:.1f} ms)"
    )
    if r.candidates:
        print()
        rows = [
            [
                c_.rank,
                c_.index,
                c_.reward,
                c_.tokens,
                c_.cumulative_logprob,
                c_.finish_reason or c_.stopped,
                c_.text,
            ]
            for c_ in r.candidates
        ]
        print(text_table(["rank", "idx", "reward", "tokens", "logprob", "finish", "text"], rows))
    return 0


def cmd_vbon(c: Client, a: argparse.Namespace) -> int:
    kwargs = dict(
        **prompt_args(a.text, a.mode),
        adapter=a.adapter,
        n=a.n,
        score=not a.no_score,
        **sampling_args(a),
    )
    if a.stream:
        reward = adapter = None
        for chunk in c.vbon_stream(**kwargs):
            if a.json:
                _print_json(chunk)
                continue
            adapter = chunk.adapter
            print(chunk.text, end="", flush=True)
            if chunk.reward is not None:
                reward = chunk.reward
        if not a.json:
            print()
            if adapter is not None:
                print(
                    f"\nadapter {adapter.name} v{adapter.version} (N={fmt(adapter.n)}, "
                    f"beta={fmt(adapter.beta)}); reward {fmt(reward)}"
                )
        return 0
    r = c.vbon(**kwargs)
    if a.json:
        _print_json(r)
        return 0
    print(r.text.strip())
    print()
    ad = r.adapter
    print(
        f"adapter {ad.name} v{ad.version} ({ad.method}, N={fmt(ad.n)}, beta={fmt(ad.beta)}, "
        f"base {ad.base_model})"
    )
    print(
        f"reward {fmt(r.reward)}; logprob {fmt(r.cumulative_logprob)}; tokens "
        f"{r.usage.completion_tokens}; time {r.timings.total_s:.2f} s"
    )
    return 0


def cmd_openai(c: Client, a: argparse.Namespace) -> int:
    fields = dict(sampling_args(a), best_of=a.best_of, n=a.choices)
    args = prompt_args(a.text, a.mode)
    if a.cmd == "complete":
        if "prompt" not in args:
            from vbon.prompts import TASK_INSTRUCTION

            args = {
                "prompt": TASK_INSTRUCTION.format(opening=a.text) if a.mode == "task" else a.text
            }
        r = c.completions(a.model, args["prompt"], **fields)
    else:
        if "messages" not in args:
            args = {"messages": [{"role": "user", "content": a.text}]}
        r = c.chat_completions(a.model, args["messages"], **fields)
    if a.json:
        _print_json(r)
        return 0
    rows = [[ch.index, ch.reward, ch.finish_reason, ch.content] for ch in r.choices]
    print(text_table(["choice", "reward", "finish", "text"], rows))
    extra = ""
    if r.bon:
        extra = f"; best of {r.bon['n']}"
        if r.bon.get("kl_bound") is not None:
            extra += f", KL bound {r.bon['kl_bound']:.3f}"
        if r.bon.get("adaptive"):
            ad = r.bon["adaptive"]
            extra += f" at most: {ad['stop_reason']} after {ad['samples']} samples"
    print(
        f"\nmodel {r.model}; tokens {r.usage.prompt_tokens} prompt + "
        f"{r.usage.completion_tokens} completion{extra}"
    )
    return 0


def cmd_info(c: Client, a: argparse.Namespace) -> int:
    if a.cmd == "health":
        h = c.health()
        _print_json(h)
        return 0 if h.get("status") == "ok" else EXIT_ERROR
    if a.cmd == "reload":
        _print_json(c.reload_adapters())
        return 0
    if a.cmd == "models":
        m = c.models()
        if a.json:
            _print_json(m)
            return 0
        print(
            text_table(["id", "kind", "N", "beta"], [[x.id, x.kind, x.n, x.beta] for x in m.data])
        )
        return 0
    r = c.ready()
    if a.json:
        _print_json(r)
    elif not r.ready:
        print(f"not ready: {r.reason or (r.engine or {}).get('error')}")
    else:
        eng, rew = r.engine or {}, r.reward or {}
        print(f"ready: model {eng.get('model')}; reward {rew.get('backend')}")
        if r.adapters:
            print(
                text_table(
                    ["adapter", "version", "method", "N"],
                    [[x["name"], x["version"], x["method"], x["n"]] for x in r.adapters],
                )
            )
        else:
            print("no adapters installed")
        for name, why in r.refused_adapters.items():
            print(f"refused adapter {name}: {why}")
    return 0 if r.ready else EXIT_ERROR


COMMANDS = {"bon": cmd_bon, "vbon": cmd_vbon, "complete": cmd_openai, "chat": cmd_openai}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(
            args.url,
            api_key=args.api_key,
            admin_key=args.admin_key,
            timeout=args.timeout,
            retry=RetryPolicy(max_retries=max(0, args.retries)),
        ) as c:
            return COMMANDS.get(args.cmd, cmd_info)(c, args)
    except (VBoNClientError, ValueError) as exc:
        if args.debug:
            raise
        where = f" (from {args.url or default_url()})" if isinstance(exc, APIError) else ""
        print(f"error: {exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
