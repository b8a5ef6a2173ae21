"""What a request gets back (`Scored`), and its items in flight until they are (`Pending`)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from app.engine.errors import EngineError

Outputs = list[float]  # one item's row of the model's outputs: `Readout` (app.model.readout) makes it a reward


@dataclass(frozen=True, slots=True)
class ItemResult:
    outputs: Outputs
    num_tokens: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class Timing:
    tokenize_s: float
    queue_s: float  # from admission to the first forward pass that held one of the request's items
    inference_s: float  # forward passes that held the request's items


@dataclass(frozen=True, slots=True)
class Scored:
    results: list[ItemResult]
    timing: Timing


class Pending:
    """One request's items in flight; touched by the inference thread only, resolved on the event loop."""

    __slots__ = ("enqueued", "failed", "future", "inference_s", "loop", "remaining", "rewards", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[Outputs]] = loop.create_future()
        self.rewards: list[Outputs] = [[math.nan]] * size
        self.remaining = size
        self.failed = False
        self.enqueued = time.perf_counter()
        self.started: float | None = None
        self.inference_s = 0.0

    def record(self, index: int, outputs: Outputs) -> None:
        self.rewards[index] = outputs
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(settle, self.future, self.rewards, None)

    def fail(self, error: EngineError) -> None:
        if not self.failed:
            self.failed = True
            self.loop.call_soon_threadsafe(settle, self.future, None, error)


def settle(future: asyncio.Future[list[Outputs]], rewards: list[Outputs] | None, error: Exception | None) -> None:
    if future.done():  # cancelled: the caller went away or its deadline passed
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(rewards)  # type: ignore[arg-type]
