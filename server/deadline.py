"""One time limit per request (VBON_REQUEST_TIMEOUT_S), shared by every engine call and every
scoring the request makes, so that a request with 16 prompts cannot run 16 times the limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.errors import APIError


@dataclass(frozen=True)
class Deadline:
    at: float  # event-loop time at which the request is out of time
    seconds: float  # the limit it was given, for the message

    @classmethod
    def start(cls, seconds: float) -> Deadline:
        return cls(asyncio.get_running_loop().time() + seconds, seconds)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Work inside ends with a 504 once the deadline has passed. In a generator, enter it
        around awaits only, never around a `yield`: the cancellation must land in our code,
        not in the consumer's."""
        try:
            async with asyncio.timeout_at(self.at):
                yield
        except TimeoutError:
            raise APIError(
                504,
                f"the request took longer than {self.seconds:g} s (VBON_REQUEST_TIMEOUT_S): "
                "lower n, max_tokens or the number of prompts, or retry",
            ) from None
