"""Bounded admission: at most `limit` samples generating at once; beyond it, 429 at once
(with Retry-After) rather than an unbounded queue.

Background work (the shadow BoN comparisons of server/shadow.py) holds units as a preemptible
`Lease`: it is counted like any request, but a user's request that would not fit otherwise
revokes leases first, so background work never causes a 429."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from server.errors import APIError


class Lease:
    """Units held by background work until released or revoked (whichever comes first)."""

    def __init__(self, budget: SampleBudget, samples: int, on_revoke: Callable[[], None]) -> None:
        self.samples = samples
        self.revoked = False
        self._budget = budget
        self._on_revoke = on_revoke
        self._held = True

    def release(self) -> None:
        """Give the units back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self._budget._leases.remove(self)
            self._budget.release(self.samples)

    def revoke(self) -> None:
        """Give the units back now and tell the holder to stop (it aborts its engine work)."""
        if self._held:
            self.revoked = True
            self.release()
            self._on_revoke()


class SampleBudget:
    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.in_flight = 0
        self.retry_after_s = retry_after_s
        self.rejected = 0
        self._freed = asyncio.Event()
        self._leases: list[Lease] = []  # oldest first

    @property
    def preemptible(self) -> int:
        """Units held by leases, which a user's request may take over."""
        return sum(lease.samples for lease in self._leases)

    def lease(self, samples: int, on_revoke: Callable[[], None]) -> Lease | None:
        """Units for background work if they fit now (None if not): never a 429, never
        revoking another lease. `on_revoke` is called if a user's request takes them back."""
        if self.in_flight + samples > self.limit:
            return None
        self.in_flight += samples
        lease = Lease(self, samples, on_revoke)
        self._leases.append(lease)
        return lease

    def _make_room(self, samples: int) -> None:
        """Revoke leases, newest first (the least work lost), until `samples` fit; none at all
        if even revoking every lease would not make room (the 429 is then not theirs)."""
        if self.in_flight - self.preemptible + samples > self.limit:
            return
        while self.in_flight + samples > self.limit and self._leases:
            self._leases[-1].revoke()

    def check(self, samples: int) -> None:
        """Raise 429 now if `samples` more would not fit (after revoking leases)."""
        self._make_room(samples)
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
            self._make_room(samples)
            if self.in_flight + samples <= self.limit:
                break
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
