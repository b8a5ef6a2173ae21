"""TRL reward functions backed by the reward server: `GRPOTrainer(reward_funcs=[RewardFunction(base_url=...)])`.

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)` and wants one
float (or None: "no reward for this sample") per completion. Both the standard (strings) and the conversational
(message lists) formats are handled. Only httpx and the standard library are imported: no trl, no torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeVar

from app.clients.client import AsyncRewardClient, RewardClient
from app.clients.errors import RewardServerError
from app.clients.results import ScoreResult
from app.clients.wire import Prompt, to_item

__all__ = ["DEFAULT_NAME", "FALLBACK_STATUSES", "AsyncRewardFunction", "RewardFunction", "SpreadFunction", "to_items"]

log = logging.getLogger(__name__)

DEFAULT_NAME = "reward_server"
# Statuses that may mean "some item in this request is bad" rather than "the service is broken": on these the
# batch is re-sent item by item and the items the server still refuses get None.
FALLBACK_STATUSES = frozenset({400, 413, 422})


def to_items(prompts: Sequence[Prompt], completions: Sequence[Prompt]) -> list[dict[str, Any]]:
    """TRL's prompts/completions as /score items: `{"prompt", "response"}` for text, `{"messages"}` for chats."""
    return [to_item(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]


C = TypeVar("C")


def _client_or_url(client: C | str | None, kwargs: dict[str, Any]) -> tuple[C | None, dict[str, Any]]:
    """`RewardFunction("http://host:8000")`, the natural call, means the base URL of a client built here."""
    if isinstance(client, str):
        if "base_url" in kwargs:
            raise ValueError("the URL is given twice: positionally and as base_url")
        return None, {**kwargs, "base_url": client}
    if client is not None and kwargs:
        raise ValueError("pass either a client or the arguments to build one, not both")
    return client, kwargs


class _RewardFunctionBase:
    """What both reward functions share: the TRL-facing name and turning TRL's arguments into items."""

    def __init__(self, name: str, fallback_statuses: frozenset[int]) -> None:
        self.__name__ = name  # TRL logs each reward function's metrics under its __name__
        self.fallback_statuses = fallback_statuses
        self.warned: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r}, base_url={self._base_url()!r})"

    def _base_url(self) -> str:
        raise NotImplementedError

    def _falls_back(self, error: RewardServerError) -> bool:
        return error.status_code in self.fallback_statuses

    def _warn(self, warnings: Sequence[str]) -> None:
        """The server's reward-hacking warnings for this run, into the trainer's log as they start (not every step)."""
        for warning in warnings:
            if warning not in self.warned:
                log.warning("%s: the reward server warns: %s", self, warning)
        self.warned = set(warnings)

    def _log_refused(self, results: Sequence[float | None], first: RewardServerError | None) -> None:
        refused = sum(r is None for r in results)
        if refused:
            log.warning("%s: the server refused %d of %d item(s), given None: %s", self, refused, len(results), first)


class RewardFunction(_RewardFunctionBase):
    """Synchronous TRL reward function over a `RewardClient`.

    Pass `client` to share one (it is then not closed by `close()`), or the client's keyword arguments
    (`base_url`, `api_key`, `timeout`, `max_retries`, ...) to make one owned by this function.
    """

    def __init__(
        self,
        client: RewardClient | str | None = None,
        *,
        name: str = DEFAULT_NAME,
        fallback_statuses: frozenset[int] = FALLBACK_STATUSES,
        **client_kwargs: Any,
    ) -> None:
        super().__init__(name, fallback_statuses)
        client, client_kwargs = _client_or_url(client, client_kwargs)
        self._owns_client = client is None
        self.client = client if client is not None else RewardClient(**client_kwargs)
        self.last: tuple[list[dict[str, Any]], ScoreResult] | None = None  # the last batch, for `spread`

    def _base_url(self) -> str:
        return self.client.base_url

    def spread(self, name: str | None = None) -> SpreadFunction:
        """A companion reward function for TRL's per-function logging: give it weight 0 (`reward_weights=[1.0,
        0.0]`) and TRL logs the ensemble's disagreement as `rewards/<name>/mean` beside the reward."""
        return SpreadFunction(self, name or f"{self.__name__}_std")

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Prompt],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion; `completion_ids` and extra dataset columns are accepted and ignored."""
        items = to_items(prompts, completions)
        self.last = None
        try:
            result = self.client.score(items)
            self.last = items, result
            self._warn(result.warnings)
            return list(result.rewards)
        except RewardServerError as error:
            if not self._falls_back(error):
                raise
        results: list[float | None] = []
        first: RewardServerError | None = None
        for item in items:
            try:
                results.append(self.client.score([item]).rewards[0])
            except RewardServerError as error:
                if not self._falls_back(error):
                    raise
                first = first or error
                results.append(None)
        self._log_refused(results, first)
        return results

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


class SpreadFunction:
    """Per completion, the standard deviation of an ensemble's members on it (None from a single model, or for an
    item the server refused), read from the batch its `RewardFunction` just scored; TRL calls reward functions in
    order on the same batch, so list it after that one (another batch is scored again)."""

    def __init__(self, source: RewardFunction, name: str) -> None:
        self.source = source
        self.__name__ = name

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[Prompt], **kwargs: Any) -> list[float | None]:
        if self.source.last is None or self.source.last[0] != to_items(prompts, completions):
            self.source(prompts, completions)
        if self.source.last is None:  # scored item by item (some were refused): no spread to report
            return [None] * len(completions)
        return [item.std for item in self.source.last[1].items]


class AsyncRewardFunction(_RewardFunctionBase):
    """Asynchronous TRL reward function over an `AsyncRewardClient`; TRL awaits it alongside other async rewards.

    TRL picks its await path with `inspect.iscoroutinefunction(reward_func)` (older releases: the asyncio
    variant), which is False for an object with an `async def __call__`. The instance therefore also presents
    itself as a coroutine function, with the signature TRL calls it with.
    """

    def __init__(
        self,
        client: AsyncRewardClient | str | None = None,
        *,
        name: str = DEFAULT_NAME,
        fallback_statuses: frozenset[int] = FALLBACK_STATUSES,
        **client_kwargs: Any,
    ) -> None:
        super().__init__(name, fallback_statuses)
        client, client_kwargs = _client_or_url(client, client_kwargs)
        self._owns_client = client is None
        self.client = client if client is not None else AsyncRewardClient(**client_kwargs)
        # Function-like attributes: inspect treats such an object as a function and reads CO_COROUTINE off __code__.
        self.__code__ = _reward_signature.__code__
        self.__defaults__ = _reward_signature.__defaults__
        self.__kwdefaults__ = _reward_signature.__kwdefaults__
        self.__annotations__ = dict(_reward_signature.__annotations__)

    def _base_url(self) -> str:
        return self.client.base_url

    async def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Prompt],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """One reward per completion; `completion_ids` and extra dataset columns are accepted and ignored."""
        items = to_items(prompts, completions)
        try:
            result = await self.client.score(items)
            self._warn(result.warnings)
            return list(result.rewards)
        except RewardServerError as error:
            if not self._falls_back(error):
                raise
        gate = asyncio.Semaphore(self.client.max_concurrency)
        refused: list[RewardServerError] = []

        async def one(item: dict[str, Any]) -> float | None:
            async with gate:
                try:
                    return (await self.client.score([item])).rewards[0]
                except RewardServerError as error:
                    if not self._falls_back(error):
                        raise
                    refused.append(error)
                    return None

        results = list(await asyncio.gather(*(one(item) for item in items)))
        self._log_refused(results, refused[0] if refused else None)
        return results

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()


async def _reward_signature(
    prompts: Sequence[Prompt],
    completions: Sequence[Prompt],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Never called: its code object gives `AsyncRewardFunction` instances a coroutine function's signature."""
    raise NotImplementedError
