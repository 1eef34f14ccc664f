"""A reward model served by vLLM's pooling runner on another machine (`VBON_REWARD=http://host:port`).

Serve any sequence-classification / reward model with
`vllm serve <folder> --runner pooling` (or `python -m vllm.entrypoints.openai.api_server ...`)
and scale it apart from the policy. What vLLM 0.32 offers, checked against a real server:

- `POST /classify` with `"use_activation": false` returns each input's raw head outputs in
  `data[i].probs` (one float per label). By default (`use_activation` null) it applies the
  pooler's activation: sigmoid for a single-logit reward model and softmax for several labels,
  which squashes the reward (softmax over one logit is 1.0 for everything). We always send
  `false`: the reward is the chosen label's raw logit, the same number `HFClassifierReward`
  reads locally from the same folder.
- `POST /pooling` with `"task": "classify", "use_activation": false` returns the same numbers,
  `/score` is for (query, document) pairs: neither adds anything here.
- An input longer than the server's context fails the WHOLE batch with a 400, so we send
  `truncate_prompt_tokens` (the smaller of VBON_REWARD_MAX_LENGTH and the served
  `max_model_len`, which `/v1/models` reports) with `truncation_side: "right"`: the first tokens
  are kept, as the local classifier's tokenizer does.
- An empty input fails the whole batch too ("The decoder prompt cannot be empty"): an empty
  completion is sent as one space.
- `GET /v1/models` names the served model (default model name) and its `root` folder; where
  that folder is readable here (a shared models volume), its config.json's labels let a label
  be chosen by name, as for a local classifier. Elsewhere a label is an index, and the default
  is the last label (index 0 for a single-logit reward model).
- `GET /health` is 200 while the server's engine works.

As the local classifier does, the completion alone is scored (not prompt + completion).

One `score()` is one batched POST (vLLM batches it on the server). Connection errors (a connect
timeout included) are retried with exponential backoff; then `RewardServerError` (502). A slow
answer is a 504 at once (retrying would only double the wait). The gateway turns these into
its own 502/504 naming the server.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from vbon.errors import ConfigError
from vbon.rewards.base import check_batch

logger = logging.getLogger(__name__)


class RewardServerError(RuntimeError):
    """The remote reward server failed: `status` 504 on a timeout, 502 when it is unreachable
    (after retries) or answers an error or something unusable. The message names its URL."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_remote_spec(spec: str) -> bool:
    return spec.strip().lower().startswith(("http://", "https://"))


def check_url(url: str) -> str:
    """The base URL without a trailing slash; a ConfigError for anything else."""
    text = url.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"reward server URL '{url}' is not valid: give http(s)://host:port of a vLLM pooling "
            "server (vllm serve <classifier> --runner pooling)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"reward server URL '{url}' must not have a query or fragment")
    return text


class RemoteReward:
    """Scores completions through a vLLM pooling server's /classify (raw logits)."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        label: int | str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 2,
        max_length: int = 512,
        backoff_s: float = 0.2,
        health_ttl_s: float = 2.0,
    ) -> None:
        self.url = check_url(url)
        self.name = f"remote:{self.url}"
        self.timeout_s = timeout_s
        self.retries = max(0, retries)
        self.max_length = max_length
        self.backoff_s = backoff_s
        self.health_ttl_s = health_ttl_s
        self._want_model = model
        self._label = label
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A short connect timeout: a server that is down refuses at once, one that is
        # unreachable should not eat the whole scoring budget before the retries.
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        )
        self._lock = threading.Lock()
        self._model: str | None = None
        self._max_model_len: int | None = None
        self._label_index: int | None = None  # known once the served model's labels are
        self._health: tuple[float, str | None] | None = None
        try:
            self._resolve()
        except RewardServerError as exc:
            # Not fatal: the reward server may start after the gateway (compose, k8s). /ready
            # says it is down, and the first score() tries again.
            logger.warning("reward server not reachable yet: %s", exc.message)

    # -- discovery ---------------------------------------------------------------------------

    def _resolve(self) -> str:
        """The served model's name (asked once from /v1/models), its context and labels."""
        with self._lock:
            if self._model is not None:
                return self._model
            body = self._request("GET", "/v1/models", retries=self.retries)
            try:
                cards = [c for c in body["data"] if isinstance(c.get("id"), str)]
            except (KeyError, TypeError, AttributeError) as exc:
                raise self._garbage("/v1/models", body) from exc
            served = [c["id"] for c in cards]
            if not cards:
                raise RewardServerError(502, f"reward server {self.url} serves no model")
            if self._want_model is None:
                card = cards[0]
            else:
                match = [c for c in cards if c["id"] == self._want_model]
                if not match:
                    raise ConfigError(
                        f"reward server {self.url} does not serve model '{self._want_model}' "
                        f"(it serves {served}): fix VBON_REWARD_MODEL or leave it unset"
                    )
                card = match[0]
            mml = card.get("max_model_len")
            self._max_model_len = mml if isinstance(mml, int) and mml > 0 else None
            self._label_index = self._label_from_config(card.get("root"))
            self._model = card["id"]
            logger.info(
                "reward server %s: model %s, max_model_len %s, label %s",
                self.url, self._model, self._max_model_len, self._label_index,
            )  # fmt: skip
            return self._model

    def _label_from_config(self, root: object) -> int | None:
        """Resolve the label like a local classifier where the served folder is readable here;
        else an index now, or None (the last label, decided from the first answer)."""
        from vbon.rewards.hf_classifier import pick_label

        config = Path(root) / "config.json" if isinstance(root, str) and root else None
        cfg: dict[str, Any] | None = None
        if config is not None and config.is_file():
            try:
                cfg = json.loads(config.read_text())
            except (OSError, ValueError):
                logger.warning("cannot read %s: reward labels by index only", config)
        if isinstance(cfg, dict):
            id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
            num_labels = int(cfg.get("num_labels") or len(id2label) or 1)
            return pick_label(id2label, num_labels, self._label)
        if self._label is None or self._label == "":
            return None
        if isinstance(self._label, int) or str(self._label).lstrip("-").isdigit():
            return int(self._label)
        raise ConfigError(
            f"reward label '{self._label}' is a name, but the labels of the model served at "
            f"{self.url} are not readable here: give the label's index (VBON_REWARD_LABEL)"
        )

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, json_body: Any = None, retries: int = 0) -> Any:
        """One call, retried on connection errors; the parsed JSON body."""
        for attempt in range(retries + 1):
            try:
                r = self._client.request(method, path, json=json_body)
                break
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                    # Never connected: a connection error (retried, then 502), not slowness.
                    if attempt < retries:
                        time.sleep(self.backoff_s * 2**attempt)
                        continue
                    msg = (f"reward server {self.url} is unreachable (connect timeout on {path}, "
                           f"{attempt + 1} tries)")  # fmt: skip
                    self._set_health(msg)
                    raise RewardServerError(502, msg) from exc
                # (Slow is not down: readiness is left to /health.)
                raise RewardServerError(
                    504, f"reward server {self.url} did not answer {path} within {self.timeout_s} s"
                ) from exc
            except httpx.TransportError as exc:
                if attempt < retries:
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
                msg = (
                    f"reward server {self.url} is unreachable ({type(exc).__name__} on {path}, "
                    f"{attempt + 1} tries)"
                )
                self._set_health(msg)
                raise RewardServerError(502, msg) from exc
        if r.status_code >= 400:
            raise RewardServerError(
                502, f"reward server {self.url} answered {path} with {r.status_code}: "
                f"{_error_text(r)}"
            )  # fmt: skip
        try:
            return r.json()
        except ValueError as exc:
            raise self._garbage(path, r.text) from exc

    def _garbage(self, path: str, body: object) -> RewardServerError:
        return RewardServerError(
            502, f"reward server {self.url} answered {path} with something unusable: "
            f"{str(body)[:200]}"
        )  # fmt: skip

    # -- RewardModel -------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        if not completions:
            return []
        try:
            model = self._resolve()
        except ConfigError as exc:  # found out only now: the server was down at start
            raise RewardServerError(502, str(exc)) from exc
        texts = [c if c else " " for c in completions]
        trunc = min(self.max_length, self._max_model_len) if self._max_model_len else -1
        body = {
            "model": model,
            "input": texts,
            "use_activation": False,  # raw logits, never sigmoid/softmax (module docstring)
            "truncate_prompt_tokens": trunc,
            "truncation_side": "right",
        }
        answer = self._request("POST", "/classify", body, retries=self.retries)
        scores = self._parse(answer, len(texts))
        self._set_health(None)
        return scores

    def _parse(self, answer: Any, n: int) -> list[float]:
        try:
            items = sorted(answer["data"], key=lambda d: d["index"])
            rows = [[float(p) for p in item["probs"]] for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._garbage("/classify", answer) from exc
        if len(rows) != n or any(not row for row in rows):
            raise self._garbage("/classify", f"{len(rows)} results for {n} inputs")
        num = len(rows[0])
        idx = self._label_index if self._label_index is not None else num - 1
        if not 0 <= idx < num:
            raise RewardServerError(
                502, f"reward label index {idx} is out of range: the model served at {self.url} "
                f"has {num} labels (0..{num - 1}); fix VBON_REWARD_LABEL"
            )  # fmt: skip
        scores = [row[idx] for row in rows]
        if not all(math.isfinite(s) for s in scores):
            raise self._garbage("/classify", "non-finite scores")
        return scores

    def health(self) -> str | None:
        """None while the server's /health answers 200; else why not. Cached for a few seconds
        (every /ready asks); blocking: call it off the event loop."""
        now = time.monotonic()
        cached = self._health
        if cached is not None and now - cached[0] < self.health_ttl_s:
            return cached[1]
        error: str | None
        try:
            r = self._client.get("/health", timeout=min(self.timeout_s, 2.0))
            error = None if r.status_code == 200 else (
                f"reward server {self.url} /health answered {r.status_code}"
            )  # fmt: skip
        except httpx.HTTPError as exc:
            error = f"reward server {self.url} is unreachable ({type(exc).__name__})"
        if error is None and self._model is None:
            try:
                self._resolve()
            except (RewardServerError, ConfigError) as exc:
                error = str(exc)
        self._set_health(error)
        return error

    def _set_health(self, error: str | None) -> None:
        self._health = (time.monotonic(), error)

    def describe(self) -> dict[str, object]:
        return {
            "backend": "remote",
            "url": self.url,
            "endpoint": "/classify",
            "model": self._model or self._want_model,
            "label_index": self._label_index,
            "max_length": self.max_length,
            "input": "completion",
        }

    def close(self) -> None:
        self._client.close()


def _error_text(r: httpx.Response) -> str:
    """The server's error message (vLLM's {"error": {"message"}}), short."""
    msg: object = None
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else err or body.get("detail")
    return str(msg or r.text or r.reason_phrase)[:200]
