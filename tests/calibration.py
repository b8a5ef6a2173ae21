"""Load sized to this machine as it is now, so that a busy machine runs less load (and waits longer for it) instead
of timing out, and a fast one still runs the full load. A soak keeps its requests in flight for `TARGET_S` seconds
(`REWARD_TEST_LOAD_S`, default 25) and counts what was served in that time; a test with a deadline first times a few
requests of its own shape against its own server (`seconds_per_request`) and scales the deadline by that speed."""

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
