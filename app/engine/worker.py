"""The model worker: admits requests, queues their items, and runs batches on the one thread that owns the model.

Request path (event loop): admission (not ready, queue full: refused at once) -> tokenize in a thread pool -> one
queue entry per item -> await the request's future, within its deadline. Model path (inference thread): next batch
from `TokenBudgetQueue` -> one forward pass -> results handed back with `call_soon_threadsafe`. A failing batch is
split and retried; an item that still fails fails only its own request. Items of requests that timed out or were
abandoned are never computed. Failures are the engine's own exceptions (`app.engine.errors`), never HTTP statuses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch

from app.engine.batching import BatchPolicy, TokenBudgetQueue
from app.engine.errors import BackendFailed, DeadlineExceeded, EngineError, InputRejected, NotReady, Overloaded
from app.engine.memory import Trimmer
from app.engine.observer import EngineObserver, WorkerStats
from app.engine.offline import Queued
from app.model.recipe import Item, ScoringInput, UnreadableItem
from app.model.reward_model import RewardModel
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

    def fail(self, error: EngineError) -> None:
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


def settings_policy(settings: Settings) -> BatchPolicy:
    """The batch policy the settings ask for (its fields are settings of the same names), before it is fitted to a
    model (`BatchPolicy.for_model`)."""
    return BatchPolicy(**settings.model_dump(include={f.name for f in fields(BatchPolicy)}))


class Worker:
    def __init__(
        self,
        model: RewardModel,
        settings: Settings,
        observer: EngineObserver | None = None,
        on_death: Callable[[], None] | None = None,
    ) -> None:
        """`on_death`: called (on the model thread) once it died and every admitted request was failed; the server
        exits there, so that an orchestrator restarts it."""
        self.model = model
        self.on_death = on_death
        self.settings = settings
        self.observer = observer or EngineObserver()
        self.stats = WorkerStats()
        self._queue: TokenBudgetQueue[_Entry] = TokenBudgetQueue(settings_policy(settings))  # fitted at warm-up
        self.observer.track_queue(lambda: len(self._queue))
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokenizers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._inflight: set[_Pending] = set()  # admitted and not yet answered: what a dying model thread fails
        # items of admitted requests not yet queued (tokenizing): admission counts them beside the queue, and a
        # stopping model thread waits for them
        self._reserved = 0
        self._trimmer = Trimmer()  # gives memory back to the system when the queue drains
        self.ready = False
        self.threads = 0  # the model thread's CPU threads, known once it warmed up
        self.failure: str | None = None  # set when the model thread died: nothing is served after it

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
        """Fits the policy to the model (whether it can share prompts is measured by forwards, so here) and runs a
        first forward, which pays one-off costs."""
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        self.threads = torch.get_num_threads()  # OpenMP's count is per thread: this one's is the model's
        self._queue.policy = self._queue.policy.for_model(self.model)
        warm = self.model.encoder.encode_batch([ScoringInput("Hello, who are you?", "I am a helpful assistant.")])
        self.model.score(warm, *self.policy.layout)
        log.info("prompt sharing: %s; batch invariance: %s", self.policy.share_prefixes, self.policy.batch_invariant)

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
    def policy(self) -> BatchPolicy:
        """The one batch policy in force: what `/info` reports and what every batch is planned with."""
        return self._queue.policy

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    # ---- request path (event loop) ----------------------------------------------------------------
    def _admit(self, count: int) -> None:
        """Under the lock. Counts the items of requests still tokenizing (`_reserved`) beside the queued ones, so
        that a burst is refused at once, not after each request has been tokenized."""
        if self.failure is not None:
            raise self._dead()
        if not self.ready:
            raise NotReady("the model is not ready (starting or shutting down)")
        if len(self._queue) + self._reserved + count > self.settings.max_queue_items:
            pruned = self._queue.prune()  # count live work only: entries of requests that timed out or left go first
            if pruned:
                self.observer.dropped(pruned)
        waiting = len(self._queue) + self._reserved
        if waiting + count > self.settings.max_queue_items:
            raise Overloaded(f"the queue is full ({waiting} items admitted and waiting); retry later")

    async def score(self, inputs: list[Item], timeout: float | None = None, stated: float | None = None) -> Scored:
        """Raw rewards (never normalized) for `inputs`, in order, within `timeout` seconds from now, tokenizing
        included; `stated`: the request's whole deadline, which the 504 names (default: `timeout`)."""
        if not inputs:
            with self._cond:
                self._admit(0)
            return Scored([], Timing(0.0, 0.0, 0.0))
        with self._cond:
            self._admit(len(inputs))  # before tokenizing: reject cheaply
            self._reserved += len(inputs)
        reserved, pending = len(inputs), None
        try:
            async with asyncio.timeout(timeout):
                loop = asyncio.get_running_loop()
                began = time.perf_counter()
                try:
                    chunk = self.settings.tokenize_chunk_chars
                    encode = functools.partial(self.model.encoder.encode_batch, chunk_chars=chunk)
                    encoded = await loop.run_in_executor(self._tokenizers, encode, inputs)
                except UnreadableItem as exc:
                    raise InputRejected(f"item {exc.index}: {exc.reason}", param=f"items[{exc.index}]") from exc
                tokenize_s = time.perf_counter() - began
                self.observer.tokenized(tokenize_s)
                empty = next((i for i, e in enumerate(encoded) if not e.input_ids), None)
                if empty is not None:  # e.g. an empty raw query with a tokenizer that adds no special tokens
                    raise InputRejected(f"item {empty} has no tokens to score (empty text)", param=f"items[{empty}]")
                pending = _Pending(loop, len(encoded))
                with self._cond:
                    if self.failure is not None:
                        raise self._dead()
                    self._queue.extend(_Entry(enc, i, pending) for i, enc in enumerate(encoded))
                    self._inflight.add(pending)
                    self._reserved -= reserved
                    reserved = 0
                    self._cond.notify_all()
                rewards = await pending.future
        except TimeoutError:
            deadline = stated if stated is not None else timeout
            raise DeadlineExceeded(
                f"not scored within the request's deadline of {deadline:g} s; its items were dropped"
            ) from None
        finally:
            with self._cond:
                if reserved:  # refused or cancelled before its items were queued
                    self._reserved -= reserved
                    self._cond.notify_all()
                if pending is not None:
                    self._inflight.discard(pending)
        started = pending.started if pending.started is not None else time.perf_counter()
        timing = Timing(tokenize_s, started - pending.enqueued, pending.inference_s)
        self.observer.started(timing.queue_s)
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
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 (outside any batch's own handling: this thread cannot go on)
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """Fail fast instead of letting callers wait out their deadlines: not ready, every admitted request answered
        503, health failing (so an orchestrator or Ray replaces the process)."""
        log.critical("the model thread died", exc_info=exc)
        with self._cond:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.ready = False
            for pending in self._inflight:
                pending.fail(self._dead())
        if self.on_death is not None:
            self.on_death()

    def _dead(self) -> NotReady:
        return NotReady(f"the model thread died ({self.failure}); the service must be restarted")

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and (not self._stopping or self._reserved):
                    self._cond.wait()
                if not self._queue:
                    return  # stopping, and everything admitted is done
                dropped = self._queue.dropped
                batch = self._queue.next_batch()
                if self._queue.dropped > dropped:
                    self.observer.dropped(self._queue.dropped - dropped)
            if batch:
                self._run_batch(batch)
                if not self._queue:
                    self._trimmer.idle()

    def _run_batch(self, batch: list[_Entry]) -> None:
        """Forward `batch`; on failure (e.g. out of memory) retry its halves, down to single items."""
        items = [e.encoded for e in batch]
        began = time.perf_counter()
        requests = {id(e.pending): e.pending for e in batch}.values()
        for pending in requests:
            if pending.started is None:
                pending.started = began
        try:
            planned = self.model.plan(items, *self.policy.layout)
            rewards = self.model.run(planned)
        except Exception as exc:  # any backend failure: split, retry, then fail only the culprit
            if len(batch) > 1:
                log.warning("forward failed for a batch of %d (%s); retrying its halves", len(batch), exc)
                half = len(batch) // 2
                self._run_batch(batch[:half])
                self._run_batch(batch[half:])
                return
            log.exception("forward failed for a single item")
            batch[0].pending.fail(BackendFailed(f"the model failed on this item: {type(exc).__name__}"))
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
                entry.pending.fail(BackendFailed(message, param=f"items[{entry.index}]"))

    def _record(self, items: int, real: int, padded_tokens: int, seconds: float) -> None:
        """`real`/`padded_tokens`: what the forward pass computed (a shared prompt counts once)."""
        stats = self.stats
        stats.batches += 1
        stats.items += items
        stats.real_tokens += real
        stats.padded_tokens += padded_tokens
        stats.batch_sizes = [*stats.batch_sizes[-999:], items]
        self.observer.batch(items, real, padded_tokens, seconds)
