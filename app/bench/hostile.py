"""The `hostile` workload's second client: while the storm's clients score, it sends, one after another until they
are done, the /score bodies that stalled a server's event loop or took it seconds to refuse (#29): 500,000 empty
items in 16 MB, a reply past the character limit, an HH transcript of 8,000 turns, nesting 100,000 levels deep, and
JSON cut off mid-string. Every server gets the same bodies at its own scoring URL; what they cost it shows as the
storm's items/s and latency beside the plain `storm`."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx

JSON = {"content-type": "application/json"}


@functools.cache
def hostile_bodies() -> tuple[bytes, ...]:
    transcript = "\n\n".join(f"{'Human' if i % 2 == 0 else 'Assistant'}: t{i}" for i in range(8000))[:199_000]
    return (
        json.dumps({"items": [{"prompt": "", "response": ""}] * 500_000}).encode(),
        json.dumps({"items": [{"prompt": "p", "response": "x" * 300_000}]}).encode(),
        json.dumps({"items": [{"prompt": transcript, "response": "r"}]}).encode(),
        b'{"items": [{"prompt": "p", "response": "r", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        b'{"items": [{"prompt": "unterminated',
    )


async def pester(url: str, stop: asyncio.Event) -> dict[int, int]:
    """Sends `hostile_bodies` in turn until `stop` is set; the statuses it got (0: no response)."""
    statuses: dict[int, int] = {}
    bodies = hostile_bodies()
    async with httpx.AsyncClient(timeout=30) as client:
        sent = 0
        while not stop.is_set():
            try:
                status = (await client.post(url, content=bodies[sent % len(bodies)], headers=JSON)).status_code
            except httpx.HTTPError:
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1
    return statuses
