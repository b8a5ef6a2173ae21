"""Python clients for the reward server: `RewardClient` (sync) and `AsyncRewardClient` (asyncio).

Only httpx is imported, so trainers can use the client without pulling in torch or the server's code. The clients
retry what is worth retrying (connection errors, 429, 502, 503, and a 500 that a proxy in front of the server sent
on its behalf) with jittered exponential backoff, split lists longer than the server's `max_items_per_request` and
join the results back in order, and turn every error body into one typed exception, `RewardServerError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncRewardClient",
    "CompareResult",
    "GroupRank",
    "ItemScore",
    "PairScore",
    "RankResult",
    "RewardClient",
    "RewardServerError",
    "ScoreResult",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503})

Item = Mapping[str, Any] | tuple[str, str]
Body = dict[str, Any]
T = TypeVar("T")
R = TypeVar("R")


# --- results -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemScore:
    """One scored sequence; `truncated` says the start of the prompt (or reply) was cut to fit the model."""

    reward: float
    num_tokens: int
    truncated: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemScore:
        return cls(reward=float(data["reward"]), num_tokens=int(data["num_tokens"]), truncated=bool(data["truncated"]))


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """`/score`: `rewards[i]` and `items[i]` belong to the i-th item sent."""

    rewards: list[float]
    items: list[ItemScore]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class PairScore:
    """One pair: Bradley-Terry P(a preferred to b) and both sides' scores."""

    probability: float
    a: ItemScore
    b: ItemScore


@dataclass(frozen=True, slots=True)
class CompareResult:
    """`/compare`: per-pair probabilities, with each side's rewards as flat lists for convenience."""

    probabilities: list[float]
    rewards_a: list[float]
    rewards_b: list[float]
    pairs: list[PairScore]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class GroupRank:
    """`/rank` for one prompt's responses: rewards and the group statistics GRPO/RLOO-style trainers use."""

    rewards: list[float]
    mean: float
    std: float
    advantages: list[float]
    loo_baselines: list[float | None]  # None for a group of one: no other response to average
    ranks: list[int]
    probabilities: list[list[float]] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupRank:
        matrix = data.get("probabilities")
        return cls(
            rewards=[float(x) for x in data["rewards"]],
            mean=float(data["mean"]),
            std=float(data["std"]),
            advantages=[float(x) for x in data["advantages"]],
            loo_baselines=[None if x is None else float(x) for x in data["loo_baselines"]],
            ranks=[int(x) for x in data["ranks"]],
            probabilities=None if matrix is None else [[float(p) for p in row] for row in matrix],
        )


@dataclass(frozen=True, slots=True)
class RankResult:
    """`/rank`: `groups[i]` belongs to the i-th group sent."""

    groups: list[GroupRank]
    fingerprint: str


# --- errors --------------------------------------------------------------------------------------------------


class RewardServerError(Exception):
    """Any failure talking to the server, typed like the server's `{"error": {...}}` body.

    `status_code` is None when no HTTP response came back (`type` is then "connection_error" and the httpx
    exception is chained as `__cause__`). `body` is the raw response text, kept for debugging.
    """

    def __init__(
        self,
        status_code: int | None,
        type: str,
        message: str,
        param: str | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(f"[{status_code if status_code is not None else '-'}] {type}: {message}")
        self.status_code = status_code
        self.type = type
        self.message = message
        self.param = param
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> RewardServerError:
        text = response.text
        try:
            detail = response.json()["error"]
            return cls(response.status_code, str(detail["type"]), str(detail["message"]), detail.get("param"), text)
        except (ValueError, KeyError, TypeError):  # not our JSON shape: a proxy, or a wrong URL
            return cls(response.status_code, "http_error", text[:500] or response.reason_phrase, None, text)


# --- shared logic --------------------------------------------------------------------------------------------


def _item_body(item: Item) -> dict[str, Any]:
    if isinstance(item, tuple):
        prompt, response = item
        return {"prompt": prompt, "response": response}
    return dict(item)


def _chunks(elements: Sequence[T], weights: Sequence[int], limit: int | None) -> list[list[T]]:
    """Greedy in-order split so each chunk's weight stays within `limit` (an element heavier than that goes alone
    and the server answers 413 for it). An empty list is one empty chunk, so the server reports it as invalid."""
    if limit is None or sum(weights) <= limit:
        return [list(elements)]
    chunks: list[list[T]] = [[]]
    total = 0
    for element, weight in zip(elements, weights, strict=True):
        if chunks[-1] and total + weight > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(element)
        total += weight
    return chunks


def _one_fingerprint(bodies: Sequence[Body]) -> str:
    fingerprints = {b["fingerprint"] for b in bodies}
    if len(fingerprints) != 1:
        raise RewardServerError(
            None,
            "fingerprint_mismatch",
            f"chunks of one call were scored by different models ({sorted(fingerprints)}); "
            "the server changed checkpoint mid-call or a load balancer mixes models",
        )
    return fingerprints.pop()


def _score_result(bodies: Sequence[Body]) -> ScoreResult:
    fingerprint = _one_fingerprint(bodies)
    items = [ItemScore.from_json(i) for b in bodies for i in b["items"]]
    return ScoreResult(rewards=[i.reward for i in items], items=items, fingerprint=fingerprint)


def _compare_result(bodies: Sequence[Body]) -> CompareResult:
    fingerprint = _one_fingerprint(bodies)
    pairs = [
        PairScore(float(p["probability"]), ItemScore.from_json(p["a"]), ItemScore.from_json(p["b"]))
        for b in bodies
        for p in b["pairs"]
    ]
    return CompareResult(
        probabilities=[p.probability for p in pairs],
        rewards_a=[p.a.reward for p in pairs],
        rewards_b=[p.b.reward for p in pairs],
        pairs=pairs,
        fingerprint=fingerprint,
    )


def _rank_result(bodies: Sequence[Body]) -> RankResult:
    fingerprint = _one_fingerprint(bodies)
    return RankResult(groups=[GroupRank.from_json(g) for b in bodies for g in b["groups"]], fingerprint=fingerprint)


def _retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True, slots=True)
class _Call(Generic[R]):
    """One logical API call: the path, its request bodies (one per chunk) and how to join the answers."""

    path: str
    bodies: list[Body]
    join: Callable[[Sequence[Body]], R]


class _BaseClient:
    """Configuration, retry policy and request splitting shared by the sync and async clients (no I/O here)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        max_items_per_request: int | None,
    ) -> None:
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("max_retries, backoff_base and backoff_max must be >= 0")
        if max_items_per_request is not None and max_items_per_request < 1:
            raise ValueError("max_items_per_request must be >= 1 (or None to ask the server)")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limit: int | None = max_items_per_request
        self._limit_known = max_items_per_request is not None
        self._rng = random.Random()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry number `attempt + 1`: the server's Retry-After, else full jitter."""
        if response is not None and (seconds := _retry_after(response)) is not None:
            return min(seconds, self.backoff_max)
        return self._rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _should_retry(self, attempt: int, outcome: httpx.Response | httpx.TransportError) -> bool:
        if attempt >= self.max_retries:
            return False
        if isinstance(outcome, httpx.TransportError) or outcome.status_code in RETRY_STATUSES:
            return True
        # A 500 without the server's typed error body came from something in front of it, e.g. Ray Serve's proxy
        # when the replica holding the request died: every call here is an idempotent scoring call, so resend it.
        return outcome.status_code == 500 and RewardServerError.from_response(outcome).type == "http_error"

    @staticmethod
    def _outcome(outcome: httpx.Response | httpx.TransportError) -> Body:
        """The JSON body of a success, else the typed error for the last outcome."""
        if isinstance(outcome, httpx.TransportError):
            raise RewardServerError(None, "connection_error", f"{type(outcome).__name__}: {outcome}") from outcome
        if not outcome.is_success:
            raise RewardServerError.from_response(outcome)
        try:
            body = outcome.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):  # e.g. a 200 HTML page: base_url points at something else
            raise RewardServerError(
                outcome.status_code, "invalid_response", "expected a JSON object", None, outcome.text
            )
        return body

    def _remember_limit(self, info: Body) -> None:
        if not self._limit_known:
            limit = info.get("limits", {}).get("max_items_per_request")
            self._limit = int(limit) if limit else None
            self._limit_known = True

    def _score_call(self, items: Sequence[Item]) -> _Call[ScoreResult]:
        bodies = [_item_body(i) for i in items]
        chunks = _chunks(bodies, [1] * len(bodies), self._limit)
        return _Call("/score", [{"items": c} for c in chunks], _score_result)

    def _compare_call(self, pairs: Sequence[Mapping[str, Any]]) -> _Call[CompareResult]:
        # The server counts a pair as two items.
        chunks = _chunks([dict(p) for p in pairs], [2] * len(pairs), self._limit)
        return _Call("/compare", [{"pairs": c} for c in chunks], _compare_result)

    def _rank_call(self, groups: Sequence[Mapping[str, Any]], probabilities: bool) -> _Call[RankResult]:
        # A group weighs as many items as it has responses; a malformed group is left for the server to reject.
        bodies = [dict(g) for g in groups]
        weights = [len(g["responses"]) if isinstance(g.get("responses"), list | tuple) else 1 for g in bodies]
        chunks = _chunks(bodies, weights, self._limit)
        return _Call("/rank", [{"groups": c, "probabilities": probabilities} for c in chunks], _rank_result)


# --- sync ----------------------------------------------------------------------------------------------------


class RewardClient(_BaseClient):
    """Blocking client over one `httpx.Client` connection pool; use it as a context manager or call `close()`."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30,
        max_items_per_request: int | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, backoff_base, backoff_max, max_items_per_request)
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

    def _request(self, method: str, path: str, json: Body | None = None) -> Body:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                outcome = exc
            if not self._should_retry(attempt, outcome):
                return self._outcome(outcome)
            self._sleep(self._delay(attempt, outcome if isinstance(outcome, httpx.Response) else None))
            attempt += 1

    def _run(self, make: Callable[[], _Call[R]]) -> R:
        if not self._limit_known:
            self.info()
        call = make()
        return call.join([self._request("POST", call.path, body) for body in call.bodies])

    def info(self) -> Body:
        """`GET /info`: the model, recipe and limits served (also caches `max_items_per_request`)."""
        info = self._request("GET", "/info")
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

    def score(self, items: Sequence[Item]) -> ScoreResult:
        """Rewards for `{"prompt", "response"}` / `{"messages"}` dicts or `(prompt, response)` tuples, in order."""
        return self._run(lambda: self._score_call(items))

    def compare(self, pairs: Sequence[Mapping[str, Any]]) -> CompareResult:
        """P(response_a preferred to response_b) for `{"prompt" | "messages", "response_a", "response_b"}` pairs."""
        return self._run(lambda: self._compare_call(pairs))

    def rank(self, groups: Sequence[Mapping[str, Any]], probabilities: bool = False) -> RankResult:
        """Per-group rewards and statistics for `{"prompt" | "messages", "responses": [...]}` groups."""
        return self._run(lambda: self._rank_call(groups, probabilities))


# --- async ---------------------------------------------------------------------------------------------------


class AsyncRewardClient(_BaseClient):
    """Asyncio client over one `httpx.AsyncClient` pool; chunks of one call go out concurrently (bounded)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30,
        max_items_per_request: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_concurrency: int = 4,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, backoff_base, backoff_max, max_items_per_request)
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

    async def _request(self, method: str, path: str, json: Body | None = None) -> Body:
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                outcome = exc
            if not self._should_retry(attempt, outcome):
                return self._outcome(outcome)
            await self._sleep(self._delay(attempt, outcome if isinstance(outcome, httpx.Response) else None))
            attempt += 1

    async def _run(self, make: Callable[[], _Call[R]]) -> R:
        if not self._limit_known:
            await self.info()
        call = make()
        gate = asyncio.Semaphore(self.max_concurrency)

        async def send(body: Body) -> Body:
            async with gate:
                return await self._request("POST", call.path, body)

        return call.join(await asyncio.gather(*(send(b) for b in call.bodies)))

    async def info(self) -> Body:
        """`GET /info`: the model, recipe and limits served (also caches `max_items_per_request`)."""
        info = await self._request("GET", "/info")
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

    async def score(self, items: Sequence[Item]) -> ScoreResult:
        """Rewards for `{"prompt", "response"}` / `{"messages"}` dicts or `(prompt, response)` tuples, in order."""
        return await self._run(lambda: self._score_call(items))

    async def compare(self, pairs: Sequence[Mapping[str, Any]]) -> CompareResult:
        """P(response_a preferred to response_b) for `{"prompt" | "messages", "response_a", "response_b"}` pairs."""
        return await self._run(lambda: self._compare_call(pairs))

    async def rank(self, groups: Sequence[Mapping[str, Any]], probabilities: bool = False) -> RankResult:
        """Per-group rewards and statistics for `{"prompt" | "messages", "responses": [...]}` groups."""
        return await self._run(lambda: self._rank_call(groups, probabilities))
