"""Bounded admission: at most `limit` samples generating at once; beyond it, 429 at once
(with Retry-After) rather than an unbounded queue."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import APIError


class SampleBudget:
    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.in_flight = 0
        self.retry_after_s = retry_after_s
        self.rejected = 0

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

    @contextmanager
    def hold(self, samples: int) -> Iterator[None]:
        # Runs on the event loop only, so no lock is needed.
        self.check(samples)
        self.in_flight += samples
        try:
            yield
        finally:
            self.in_flight -= samples
