"""What the sync and async clients share, without I/O: configuration, the retry policy, and splitting a call into
requests that fit the server's `max_items_per_request`."""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

import httpx

from app.clients.errors import RewardServerError
from app.clients.results import Body, CompareResult, RankResult, ScoreResult, compare_result, rank_result, score_result
from app.clients.wire import Item, item_body

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503})

T = TypeVar("T")
R = TypeVar("R")


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
class Call(Generic[R]):
    """One logical API call: the path, its request bodies (one per chunk) and how to join the answers."""

    path: str
    bodies: list[Body]
    join: Callable[[Sequence[Body]], R]


class BaseClient:
    """Configuration, retry policy and request splitting shared by the sync and async clients (no I/O here)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int | None,
        retry_budget_s: float,
        backoff_base: float,
        backoff_max: float,
        max_items_per_request: int | None,
        resend_timeouts: bool,
        model: str | None,
        run: str | None = None,
    ) -> None:
        """`model`: the served model every call names; `run`: the training run it belongs to (`X-Run-Id`), which the
        server's reward-hacking monitor keeps apart."""
        if (max_retries is not None and max_retries < 0) or min(retry_budget_s, backoff_base, backoff_max) < 0:
            raise ValueError("max_retries, retry_budget_s, backoff_base and backoff_max must be >= 0")
        if max_items_per_request is not None and max_items_per_request < 1:
            raise ValueError("max_items_per_request must be >= 1 (or None to ask the server)")
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.retry_budget_s = retry_budget_s
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.resend_timeouts = resend_timeouts
        self.model = model
        self._routed = {"model": model} if model is not None else {}  # what every scoring body adds
        self._info_path = "/info" if model is None else f"/info?{urlencode({'model': model})}"
        self._wait_s = timeout.read if isinstance(timeout, httpx.Timeout) else float(timeout)
        self._server_max_wait_s: float | None = None
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.run = run
        if run:
            self._headers["X-Run-Id"] = run
        self._limit: int | None = max_items_per_request
        self._limit_known = max_items_per_request is not None
        self._rng = random.Random()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry number `attempt + 1`: the server's Retry-After plus jitter (clients told the same
        moment must not all come back at once), else full jitter."""
        if response is not None and (seconds := _retry_after(response)) is not None:
            return min(seconds, self.backoff_max) + self._rng.uniform(0, self.backoff_base)
        return self._rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _retries(self) -> _Retries:
        return _Retries(self)

    def _deadline_header(self) -> dict[str, str]:
        """`X-Request-Timeout` a little under this client's own timeout, so the server drops the items of a request
        the client is about to give up on, and says so (504), instead of computing them for no one."""
        if self._wait_s is None:
            return {}
        seconds = 0.9 * self._wait_s
        if self._server_max_wait_s is not None:
            seconds = min(seconds, self._server_max_wait_s)
        return {"X-Request-Timeout": f"{max(seconds, 0.001):g}"}

    def _retryable(self, outcome: httpx.Response | httpx.TransportError) -> bool:
        if isinstance(outcome, httpx.ReadTimeout | httpx.WriteTimeout):  # the server may still be scoring it
            return self.resend_timeouts
        if isinstance(outcome, httpx.TransportError) or outcome.status_code in RETRY_STATUSES:
            return True
        # A 500 without the server's typed error body came from something in front of it, e.g. Ray Serve's proxy
        # when the replica holding the request died: every call here is an idempotent scoring call, so resend it.
        return outcome.status_code == 500 and RewardServerError.from_response(outcome).type == "http_error"

    def _outcome(self, outcome: httpx.Response | httpx.TransportError) -> Body:
        """The JSON body of a success, else the typed error for the last outcome."""
        if isinstance(outcome, httpx.ReadTimeout | httpx.WriteTimeout) and not self.resend_timeouts:
            message = (
                f"no answer within this client's timeout ({self._wait_s:g} s); not resent, since the server may still "
                "be scoring it (resend_timeouts=True resends; a longer timeout waits)"
            )
            raise RewardServerError(None, "timeout", message) from outcome
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
        limits = info.get("limits", {})
        if limits.get("max_request_timeout_s"):
            self._server_max_wait_s = float(limits["max_request_timeout_s"])
        if not self._limit_known:
            limit = limits.get("max_items_per_request")
            self._limit = int(limit) if limit else None
            self._limit_known = True

    def _score_call(self, items: Sequence[Item], aggregate: str | None = None) -> Call[ScoreResult]:
        bodies = [item_body(i) for i in items]
        chunks = _chunks(bodies, [1] * len(bodies), self._limit)
        how = {"aggregate": aggregate} if aggregate else {}  # a process reward model's, over its steps
        return Call("/score", [{"items": c, **how, **self._routed} for c in chunks], score_result)

    def _compare_call(self, pairs: Sequence[Mapping[str, Any]]) -> Call[CompareResult]:
        # The server counts a pair as two items.
        chunks = _chunks([dict(p) for p in pairs], [2] * len(pairs), self._limit)
        return Call("/compare", [{"pairs": c, **self._routed} for c in chunks], compare_result)

    def _rank_call(self, groups: Sequence[Mapping[str, Any]], probabilities: bool) -> Call[RankResult]:
        # A group weighs as many items as it has responses; a malformed group is left for the server to reject.
        bodies = [dict(g) for g in groups]
        weights = [len(g["responses"]) if isinstance(g.get("responses"), list | tuple) else 1 for g in bodies]
        chunks = _chunks(bodies, weights, self._limit)
        return Call(
            "/rank", [{"groups": c, "probabilities": probabilities, **self._routed} for c in chunks], rank_result
        )


class _Retries:
    """One request's retries: resent while the outcome is worth resending, within the client's count (if any) and its
    budget of seconds spent waiting between tries."""

    def __init__(self, client: BaseClient) -> None:
        self.client, self.attempt, self.waited = client, 0, 0.0

    def delay(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """Seconds to wait before resending, or None: answer with this outcome."""
        c = self.client
        if not c._retryable(outcome) or (c.max_retries is not None and self.attempt >= c.max_retries):
            return None
        seconds = c._delay(self.attempt, outcome if isinstance(outcome, httpx.Response) else None)
        if self.waited + seconds > c.retry_budget_s:
            return None
        self.attempt += 1
        self.waited += seconds
        return seconds
