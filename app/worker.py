"""The model worker: admits requests, queues their items, and runs batches on the one thread that owns the model.

Request path (event loop): admission (413/429 at once) -> tokenize in a thread pool -> one queue entry per item ->
await the request's future, within its deadline. Model path (inference thread): next batch from `TokenBudgetQueue` ->
one forward pass -> results handed back with `call_soon_threadsafe`. A failing batch is split and retried; an item
that still fails fails only its own request. Items of requests that timed out or were abandoned are never computed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from app.batching import BatchPolicy, TokenBudgetQueue, padded
from app.errors import ErrorType, ServiceError
from app.metrics import Metrics
from app.ml.loading import Normalization
from app.ml.recipe import ScoringInput
from app.ml.reward_model import Queued, RewardModel
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemResult:
    reward: float
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


class _Pending:
    """One request's items in flight; touched by the inference thread only, resolved on the event loop."""

    __slots__ = ("enqueued", "failed", "future", "inference_s", "loop", "remaining", "rewards", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[float]] = loop.create_future()
        self.rewards: list[float] = [math.nan] * size
        self.remaining = size
        self.failed = False
        self.enqueued = time.perf_counter()
        self.started: float | None = None
        self.inference_s = 0.0

    def record(self, index: int, reward: float) -> None:
        self.rewards[index] = reward
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(_settle, self.future, self.rewards, None)

    def fail(self, error: ServiceError) -> None:
        if not self.failed:
            self.failed = True
            self.loop.call_soon_threadsafe(_settle, self.future, None, error)


def _settle(future: asyncio.Future[list[float]], rewards: list[float] | None, error: Exception | None) -> None:
    if future.done():  # cancelled: the caller went away or its deadline passed
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(rewards)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Entry(Queued):
    pending: _Pending

    @property
    def abandoned(self) -> bool:
        return self.pending.failed or self.pending.future.done()


@dataclass
class WorkerStats:
    """In-process counters (benchmarks, tests); Prometheus gets the same events through `Metrics`."""

    batches: int = 0
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # the last 1,000

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def _normalization(model: RewardModel, settings: Settings) -> Normalization | None:
    if not settings.normalize:
        return None
    stored = model.info.get("normalization") or {}
    mean = settings.reward_mean if settings.reward_mean is not None else stored.get("mean")
    std = settings.reward_std if settings.reward_std is not None else stored.get("std")
    if mean is None or std is None:
        raise ValueError(
            "REWARD_NORMALIZE is on but neither the settings (REWARD_REWARD_MEAN/STD) nor the checkpoint give mean/std"
        )
    return Normalization(mean=mean, std=std)


class Worker:
    def __init__(self, model: RewardModel, settings: Settings, metrics: Metrics | None = None) -> None:
        multiple = settings.pad_to_multiple_of
        if padded(model.max_length, multiple) > settings.max_batch_tokens:
            raise ValueError(
                f"max_batch_tokens ({settings.max_batch_tokens}) is smaller than one full-length item "
                f"({model.max_length} tokens padded to {padded(model.max_length, multiple)}); raise it or lower "
                "max_length"
            )
        self.model = model
        self.settings = settings
        self.normalization = _normalization(model, settings)
        self.metrics = metrics or Metrics()
        self.stats = WorkerStats()
        self._queue: TokenBudgetQueue[_Entry] = TokenBudgetQueue(
            BatchPolicy(
                max_batch_tokens=settings.max_batch_tokens,
                max_batch_size=settings.max_batch_size,
                pad_to_multiple_of=multiple,
                min_padding_efficiency=settings.min_padding_efficiency,
                lookahead=settings.lookahead,
                share_prefixes=settings.share_prefixes,
            )
        )
        self.metrics.track_queue(lambda: len(self._queue))
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokenizers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.ready = False

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Blocking: start the model thread and wait until it has warmed up (a warm-up failure is raised here).

        Every forward runs on that one thread, the warm-up included (and loading on one that exits): each thread
        that runs a parallel op keeps an OpenMP thread team while it lives, and once the teams' threads outnumber the
        cores libgomp stops spin-waiting between ops, which made a single-item forward ~40% slower on 2 cores."""
        warmed: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(warmed,), name="model-worker", daemon=True)
        self._thread.start()
        warmed.result()
        self.ready = True

    def _warm_up(self) -> None:
        """The first forward pays one-off costs; checks once whether prompts can be shared."""
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        warm = self.model.encoder.encode_batch([ScoringInput("Hello, who are you?", "I am a helpful assistant.")])
        self.model.score(warm, self.settings.pad_to_multiple_of)
        log.info("prompt sharing: %s", "on" if self.shares_prefixes else "off")

    def stop(self, timeout: float | None = None) -> None:
        """Stop admitting, finish every queued item, then end the thread."""
        self.ready = False
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)

    @property
    def shares_prefixes(self) -> bool:
        return self.settings.share_prefixes and self.model.can_share_prefixes

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    # ---- request path (event loop) ----------------------------------------------------------------
    @property
    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_seconds)}

    def _admit(self, count: int) -> None:
        if not self.ready:
            raise ServiceError(
                ErrorType.not_ready, "the model is not ready (starting or shutting down)", headers=self._retry
            )
        if count > self.settings.max_items_per_request:
            raise ServiceError(
                ErrorType.payload_too_large,
                f"{count} items to score in one request; the limit is {self.settings.max_items_per_request}: split it",
            )
        if len(self._queue) + count > self.settings.max_queue_items:
            raise ServiceError(
                ErrorType.overloaded,
                f"the queue is full ({len(self._queue)} items waiting); retry later",
                headers=self._retry,
            )

    async def score(self, inputs: list[ScoringInput], timeout: float | None = None) -> Scored:
        """Raw rewards (never normalized) for `inputs`, in order; `timeout` bounds the wait (504 after it)."""
        self._admit(len(inputs))  # before tokenizing: reject cheaply
        if not inputs:
            return Scored([], Timing(0.0, 0.0, 0.0))
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        encoded = await loop.run_in_executor(self._tokenizers, self.model.encoder.encode_batch, inputs)
        tokenize_s = time.perf_counter() - began
        self.metrics.tokenize_seconds.observe(tokenize_s)
        empty = next((i for i, e in enumerate(encoded) if not e.input_ids), None)
        if empty is not None:  # e.g. an empty raw query with a tokenizer that adds no special tokens
            raise ServiceError(
                ErrorType.validation_error, f"item {empty} has no tokens to score (empty text)", param=f"items[{empty}]"
            )
        pending = _Pending(loop, len(encoded))
        with self._cond:
            self._admit(len(encoded))
            self._queue.extend(_Entry(enc, i, pending) for i, enc in enumerate(encoded))
            self._cond.notify()
        try:
            rewards = await asyncio.wait_for(pending.future, timeout)
        except TimeoutError:
            raise ServiceError(
                ErrorType.timeout, f"not scored within the request's deadline of {timeout:g} s; its items were dropped"
            ) from None
        started = pending.started if pending.started is not None else time.perf_counter()
        timing = Timing(tokenize_s, started - pending.enqueued, pending.inference_s)
        self.metrics.queue_seconds.observe(timing.queue_s)
        results = [ItemResult(r, len(e.input_ids), e.truncated) for r, e in zip(rewards, encoded, strict=True)]
        return Scored(results, timing)

    # ---- model path (inference thread) ------------------------------------------------------------
    def _run(self, warmed: Future[None]) -> None:
        try:
            self._warm_up()
        except Exception as exc:  # noqa: BLE001 (`start` raises it again, on the thread that called it)
            warmed.set_exception(exc)
            return
        warmed.set_result(None)
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, and everything admitted is done
                dropped = self._queue.dropped
                batch = self._queue.next_batch()
                self.metrics.dropped.inc(self._queue.dropped - dropped)
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Entry]) -> None:
        """Forward `batch`; on failure (e.g. out of memory) retry its halves, down to single items."""
        items = [e.encoded for e in batch]
        began = time.perf_counter()
        requests = {id(e.pending): e.pending for e in batch}.values()
        for pending in requests:
            if pending.started is None:
                pending.started = began
        try:
            planned = self.model.plan(items, self.settings.pad_to_multiple_of, self.settings.share_prefixes)
            rewards = self.model.run(planned)
        except Exception as exc:  # any backend failure: split, retry, then fail only the culprit
            if len(batch) > 1:
                log.warning("forward failed for a batch of %d (%s); retrying its halves", len(batch), exc)
                half = len(batch) // 2
                self._run_batch(batch[:half])
                self._run_batch(batch[half:])
                return
            log.exception("forward failed for a single item")
            error = ServiceError(ErrorType.backend_error, f"the model failed on this item: {type(exc).__name__}")
            batch[0].pending.fail(error)
            self.metrics.errors.labels(ErrorType.backend_error.value).inc()
            return
        seconds = time.perf_counter() - began
        self._record(len(items), planned.real_tokens, planned.padded_tokens, seconds)
        for pending in requests:
            pending.inference_s += seconds
        for entry, reward in zip(batch, rewards, strict=True):
            if math.isfinite(reward):
                entry.pending.record(entry.index, reward)
            else:  # never let NaN/inf out as a number (it is not valid JSON) nor hide it
                message = f"the model produced a non-finite reward ({reward}) for item {entry.index}"
                entry.pending.fail(ServiceError(ErrorType.backend_error, message, param=f"items[{entry.index}]"))

    def _record(self, items: int, real: int, padded_tokens: int, seconds: float) -> None:
        """`real`/`padded_tokens`: what the forward pass computed (a shared prompt counts once)."""
        stats = self.stats
        stats.batches += 1
        stats.items += items
        stats.real_tokens += real
        stats.padded_tokens += padded_tokens
        stats.batch_sizes = [*stats.batch_sizes[-999:], items]
        self.metrics.observe_batch(items, real, padded_tokens, seconds)
