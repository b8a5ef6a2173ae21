"""Python clients for the reward server: `RewardClient` (sync) and `AsyncRewardClient` (asyncio).

Only httpx is imported, so trainers can use the client without pulling in torch or the server's code. The clients
retry what is worth retrying (connection errors, 429, 502, 503, and a 500 that a proxy in front of the server sent
on its behalf) with jittered exponential backoff, split lists longer than the server's `max_items_per_request` and
join the results back in order, and turn every error body into one typed exception, `RewardServerError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from app.clients.base import DEFAULT_BASE_URL, BaseClient, Call, R
from app.clients.errors import RewardServerError
from app.clients.results import Body, CompareResult, RankResult, ScoreResult
from app.clients.wire import Item


class RewardClient(BaseClient):
    """Blocking client over one `httpx.Client` connection pool; use it as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60,
        max_retries: int | None = None,
        retry_budget_s: float = 300,
        backoff_base: float = 0.5,
        backoff_max: float = 30,
        max_items_per_request: int | None = None,
        resend_timeouts: bool = False,
        model: str | None = None,
        run: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout,
            max_retries,
            retry_budget_s,
            backoff_base,
            backoff_max,
            max_items_per_request,
            resend_timeouts,
            model,
            run,
        )
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, json: Body | None = None, headers: dict[str, str] | None = None) -> Body:
        retries = self._retries()
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.request(method, path, json=json, headers=headers)
            except httpx.TransportError as exc:
                outcome = exc
            if (delay := retries.delay(outcome)) is None:
                return self._outcome(outcome)
            self._sleep(delay)

    def _run(self, make: Callable[[], Call[R]]) -> R:
        if not self._limit_known:
            self.info()
        call = make()
        headers = self._deadline_header()
        return call.join([self._request("POST", call.path, body, headers) for body in call.bodies])

    def info(self) -> Body:
        """`GET /info`: the model (this client's), recipe and limits served (also caches `max_items_per_request`)."""
        info = self._request("GET", self._info_path)
        self._remember_limit(info)
        return info

    def ready(self) -> bool:
        """One probe, no retries: True when the model is loaded, False while loading or unreachable."""
        try:
            response = self._http.get("/ready")
        except httpx.TransportError:
            return False
        if response.status_code == 503:
            return False
        if not response.is_success:
            raise RewardServerError.from_response(response)
        return True

    def score(self, items: Sequence[Item], aggregate: str | None = None) -> ScoreResult:
        """Rewards for `{"prompt", "response"}` / `{"messages"}` dicts or `(prompt, response)` tuples, in order; a
        process reward model's items may give `{"prompt", "steps"}`, and `aggregate` how their steps make the reward."""
        return self._run(lambda: self._score_call(items, aggregate))

    def compare(self, pairs: Sequence[Mapping[str, Any]]) -> CompareResult:
        """P(response_a preferred to response_b) for `{"prompt" | "messages", "response_a", "response_b"}` pairs."""
        return self._run(lambda: self._compare_call(pairs))

    def rank(self, groups: Sequence[Mapping[str, Any]], probabilities: bool = False) -> RankResult:
        """Per-group rewards and statistics for `{"prompt" | "messages", "responses": [...]}` groups."""
        return self._run(lambda: self._rank_call(groups, probabilities))


class AsyncRewardClient(BaseClient):
    """Asyncio client over one `httpx.AsyncClient` pool; chunks of one call go out concurrently (bounded)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60,
        max_retries: int | None = None,
        retry_budget_s: float = 300,
        backoff_base: float = 0.5,
        backoff_max: float = 30,
        max_items_per_request: int | None = None,
        resend_timeouts: bool = False,
        model: str | None = None,
        run: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_concurrency: int = 4,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout,
            max_retries,
            retry_budget_s,
            backoff_base,
            backoff_max,
            max_items_per_request,
            resend_timeouts,
            model,
            run,
        )
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.max_concurrency = max_concurrency
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, path: str, json: Body | None = None, headers: dict[str, str] | None = None
    ) -> Body:
        retries = self._retries()
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.request(method, path, json=json, headers=headers)
            except httpx.TransportError as exc:
                outcome = exc
            if (delay := retries.delay(outcome)) is None:
                return self._outcome(outcome)
            await self._sleep(delay)

    async def _run(self, make: Callable[[], Call[R]]) -> R:
        if not self._limit_known:
            await self.info()
        call = make()
        headers = self._deadline_header()
        gate = asyncio.Semaphore(self.max_concurrency)

        async def send(body: Body) -> Body:
            async with gate:
                return await self._request("POST", call.path, body, headers)

        return call.join(await asyncio.gather(*(send(b) for b in call.bodies)))

    async def info(self) -> Body:
        """`GET /info`: the model (this client's), recipe and limits served (also caches `max_items_per_request`)."""
        info = await self._request("GET", self._info_path)
        self._remember_limit(info)
        return info

    async def ready(self) -> bool:
        """One probe, no retries: True when the model is loaded, False while loading or unreachable."""
        try:
            response = await self._http.get("/ready")
        except httpx.TransportError:
            return False
        if response.status_code == 503:
            return False
        if not response.is_success:
            raise RewardServerError.from_response(response)
        return True

    async def score(self, items: Sequence[Item], aggregate: str | None = None) -> ScoreResult:
        """Rewards for `{"prompt", "response"}` / `{"messages"}` dicts or `(prompt, response)` tuples, in order; a
        process reward model's items may give `{"prompt", "steps"}`, and `aggregate` how their steps make the reward."""
        return await self._run(lambda: self._score_call(items, aggregate))

    async def compare(self, pairs: Sequence[Mapping[str, Any]]) -> CompareResult:
        """P(response_a preferred to response_b) for `{"prompt" | "messages", "response_a", "response_b"}` pairs."""
        return await self._run(lambda: self._compare_call(pairs))

    async def rank(self, groups: Sequence[Mapping[str, Any]], probabilities: bool = False) -> RankResult:
        """Per-group rewards and statistics for `{"prompt" | "messages", "responses": [...]}` groups."""
        return await self._run(lambda: self._rank_call(groups, probabilities))
