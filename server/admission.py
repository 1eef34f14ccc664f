"""Bounded admission: at most `limit` samples generating at once; beyond it, 429 at once
(with Retry-After) rather than an unbounded queue."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import APIError


class SampleBudget:
    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.in_flight = 0
        self.retry_after_s = retry_after_s
        self.rejected = 0
        self._freed = asyncio.Event()

    def check(self, samples: int) -> None:
        """Raise 429 now if `samples` more would not fit."""
        if self.in_flight + samples > self.limit:
            self.rejected += 1
            raise APIError(
                429,
                f"server busy: {self.in_flight} of {self.limit} samples in flight and this "
                f"request needs {samples}; retry after {self.retry_after_s} s",
                code="too_many_samples_in_flight",
                headers={"Retry-After": str(self.retry_after_s)},
            )

    def take(self, samples: int) -> None:
        """Count `samples` in now, or raise 429. Pair with release()."""
        # Runs on the event loop only, so no lock is needed.
        self.check(samples)
        self.in_flight += samples

    async def take_when_free(self, samples: int) -> None:
        """Count `samples` in as soon as they fit. For the later waves of an adaptive request:
        it was admitted already, so it waits (within its timeout) rather than losing its work
        to a 429."""
        while self.in_flight + samples > self.limit and self.in_flight > 0:
            self._freed.clear()
            await self._freed.wait()
        self.in_flight += samples

    def release(self, samples: int) -> None:
        self.in_flight -= samples
        self._freed.set()

    @contextmanager
    def hold(self, samples: int) -> Iterator[None]:
        self.take(samples)
        try:
            yield
        finally:
            self.release(samples)
