"""Test doubles for the gateway: `FakeBackend`, the `GenerationBackend` interface without a
model, for the fast API, client and reliability tests (the integration tests cover the same
paths against the real engine), and `bos_tokenizer`, a tokenizer that adds a BOS token."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.backend import Delta, EngineUnavailable, Generation, LoraRef, Sample
from vbon.sampling import Sampling


class FakeBackend:
    """Same interface, no model: deterministic words from a seeded RNG. For API tests only;
    the same paths are covered against the real engine by the integration tests."""

    WORDS = ("good", "bad", "great", "awful", "fine", "film", "plot", "wonderful", "boring", "ok")

    def __init__(self, delay_s: float = 0.0, max_model_len: int = 1024) -> None:
        self.model_path = "fake-model"
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.started = False
        self.dead = False
        self.running: set[str] = set()
        self.calls: list[dict[str, Any]] = []

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False

    def ready(self) -> bool:
        return self.started and not self.dead

    def error(self) -> str | None:
        return None if self.ready() else "engine not started" if not self.started else "dead"

    def fatal(self) -> str | None:
        return "the engine has died" if self.dead else None

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(self.WORDS[i] for i in token_ids)

    def _sample(self, prompt: str, sampling: Sampling, seed: int | None) -> Sample:
        rng = random.Random(f"{prompt}|{seed}" if seed is not None else None)
        k = rng.randint(1, sampling.max_tokens)
        words = [rng.choice(self.WORDS) for _ in range(k)]
        return Sample(
            " ".join(words), k, -float(k), "length" if k == sampling.max_tokens else "stop"
        )

    def _check(self) -> None:
        if not self.started or self.dead:
            raise EngineUnavailable(
                "the engine has died; the server must be restarted"
                if self.dead
                else "the engine is still loading"
            )

    async def generate(
        self, prompt: str, sampling: Sampling, n: int, request_id: str, lora: LoraRef | None = None
    ) -> Generation:
        self._check()
        self.calls.append({"prompt": prompt, "sampling": sampling, "n": n, "lora": lora})
        self.running.add(request_id)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self._check()
            seeds = [None if sampling.seed is None else sampling.seed + i for i in range(n)]
            return Generation(
                prompt_tokens=self.count_tokens(prompt),
                samples=[self._sample(prompt, sampling, s) for s in seeds],
            )
        finally:
            self.running.discard(request_id)

    async def stream(
        self, prompt: str, sampling: Sampling, request_id: str, lora: LoraRef | None = None
    ) -> AsyncIterator[Delta]:
        self._check()
        self.calls.append({"prompt": prompt, "sampling": sampling, "n": 1, "lora": lora})
        sample = self._sample(prompt, sampling, sampling.seed)
        words = sample.text.split(" ")
        self.running.add(request_id)
        try:
            for i, w in enumerate(words):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s / len(words))
                last = i == len(words) - 1
                yield Delta(
                    (" " if i else "") + w,
                    1,
                    sample.finish_reason if last else None,
                    sample.cumulative_logprob if last else None,
                    [self.WORDS.index(w)],
                )
        finally:
            self.running.discard(request_id)

    async def running_requests(self) -> int:
        return len(self.running)


def bos_tokenizer(model: Path, folder: Path) -> Any:
    """The embedded model's tokenizer (copied into `folder`), made to add a BOS token as
    Llama-style ones do, for the token-counting tests of both backends."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    tok = AutoTokenizer.from_pretrained(folder)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    return tok
