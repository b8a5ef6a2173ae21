"""Load sized to this machine as it is now. A load test first times a few requests of its own shape against its own
server, then picks its request count for a target duration and scales its deadlines by that measured speed: a busy
machine runs fewer, slower requests (and waits longer for them) instead of timing out, a fast one still runs the full
load. `REWARD_TEST_LOAD_S` sets the target seconds (default 25)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import httpx

TARGET_S = float(os.environ.get("REWARD_TEST_LOAD_S", "25"))


async def fire(url: str, bodies: list[dict[str, Any]], concurrency: int, path: str = "/score") -> list[httpx.Response]:
    """Post every body, at most `concurrency` at a time; the responses in order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(body: dict[str, Any]) -> httpx.Response:
            async with gate:
                return await client.post(path, json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def seconds_per_request(
    url: str, body: Callable[[int], dict[str, Any]], concurrency: int, at_least: float = 2.0
) -> float:
    """Wall seconds per request with `concurrency` in flight, as the server serves them now. The bodies are
    `body(0)`, `body(1)`, ... (distinct, as the load's are: identical items share their prompt in a plan and cost
    less); one untimed round first (connections, first shapes), then timed rounds until `at_least` seconds."""
    sent = 0

    async def round_() -> None:
        nonlocal sent
        for response in await fire(url, [body(sent + i) for i in range(concurrency)], concurrency):
            response.raise_for_status()
        sent += concurrency

    async def measure() -> float:
        await round_()
        began, counted = time.perf_counter(), sent
        while (elapsed := time.perf_counter() - began) < at_least or sent == counted:
            await round_()
        return elapsed / (sent - counted)

    return asyncio.run(measure())


def sized(per_request_s: float, lowest: int, highest: int, multiple: int = 1, target_s: float = TARGET_S) -> int:
    """How many requests fill `target_s` at the measured speed, within [lowest, highest], rounded to `multiple`."""
    count = int(target_s / max(per_request_s, 1e-6))
    count = min(max(count, lowest), highest)
    return max(multiple, count // multiple * multiple)
