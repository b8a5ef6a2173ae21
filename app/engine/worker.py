"""The model worker: admits requests, queues their items, plans forward passes, and runs them on the one thread that
owns the model.

The event loop owns the queue: admission (not ready, queue full: refused at once) -> tokenize in a thread pool -> one
queue entry per item -> the next plan (`TokenBudgetQueue.next_plan`) offered to the model thread through a depth-1
`Handoff`, so it is planned while the current one runs -> await the request's future, within its deadline. The
model thread takes a plan, runs it, and hands results back with `call_soon_threadsafe`. A failing plan is split and
retried; an item that still fails fails only its own request. Items of requests that timed out or were abandoned are
never computed. Failures are the engine's own exceptions (`app.engine.errors`) naming items by index, never HTTP
statuses or request fields.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.engine.batching import BatchPolicy, TokenBudgetQueue
from app.engine.errors import BackendFailed, DeadlineExceeded, InputRejected, NotReady, Overloaded
from app.engine.handoff import Handoff
from app.engine.memory import Trimmer
from app.engine.observer import EngineObserver, WorkerStats
from app.engine.offline import Queued
from app.engine.results import ItemResult, Pending, Scored, Timing
from app.model.backbones import default_cache_dir
from app.model.plan import Plan
from app.model.recipe import Item, UnreadableItem
from app.model.reward_model import RewardModel
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry(Queued):
    pending: Pending

    @property
    def abandoned(self) -> bool:
        return self.pending.failed or self.pending.future.done()


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
        self._queue: TokenBudgetQueue[_Entry] = TokenBudgetQueue(BatchPolicy(0, 0))  # set once the model is prepared
        me = weakref.ref(self)  # the observer outlives a worker the admin API unloads: it must not keep it alive
        self.observer.track_queue(lambda: len(w._queue) if (w := me()) is not None else 0)
        self._handoff: Handoff[tuple[list[_Entry], Plan] | None] = Handoff()
        self._offered = 0  # entries in the offered plan, until the loop learns it was taken
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tokenizers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._inflight: set[Pending] = set()  # admitted and not yet answered: what a dying model thread fails
        self._reserved = 0  # items of admitted requests still tokenizing: admission counts them beside the queue
        self._trimmer = Trimmer()  # gives memory back to the system when the queue drains
        self.ready = False
        self.failure: str | None = None  # set when the model thread died: nothing is served after it

    # ---- lifecycle (event loop) -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the model thread and wait until it has prepared the model (a failure is raised here).

        Every forward runs on that one thread, the probes included: each thread that runs a parallel op keeps an
        OpenMP thread team while it lives, and once the teams' threads outnumber the cores libgomp stops
        spin-waiting between ops, which made a single-item forward ~40% slower on 2 cores. The kernels are measured
        with the threads that will run them."""
        self._loop = asyncio.get_running_loop()
        warmed: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(warmed,), name="model-worker", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(warmed)
        self.ready = True

    async def stop(self, timeout: float | None = None) -> None:
        """Stop admitting, finish every admitted item, then end the thread."""
        self.ready = False
        self._stopping = True
        self._refill()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)

    @property
    def policy(self) -> BatchPolicy:
        return self._queue.policy

    @property
    def queued_items(self) -> int:
        """Items admitted and waiting for the model: queued, or in the plan offered to the model thread."""
        return len(self._queue) + self._offered

    # ---- request path (event loop) ----------------------------------------------------------------
    def _admit(self, count: int) -> None:
        """Counts the items of requests still tokenizing (`_reserved`) beside the queued ones, so that a burst is
        refused at once, not after each request has been tokenized."""
        if self.failure is not None:
            raise self._dead()
        if not self.ready:
            raise NotReady("the model is not ready (starting or shutting down)")
        if self.queued_items + self._reserved + count > self.settings.max_queue_items:
            self._reclaim()  # count live work only: entries of requests that timed out or left go first
            pruned = self._queue.prune()
            if pruned:
                self.observer.dropped(pruned)
            self._refill()
        waiting = self.queued_items + self._reserved
        if waiting + count > self.settings.max_queue_items:
            raise Overloaded(f"the queue is full ({waiting} items admitted and waiting); retry later")

    async def score(self, inputs: list[Item], timeout: float | None = None, stated: float | None = None) -> Scored:
        """Each of `inputs`' outputs (before any readout or normalization), in order, within `timeout` seconds from
        now, tokenizing included; `stated`: the request's whole deadline, which the 504 names (default: `timeout`)."""
        self._admit(len(inputs))  # before tokenizing: reject cheaply
        if not inputs:
            return Scored([], Timing(0.0, 0.0, 0.0))
        loop = asyncio.get_running_loop()
        pending = Pending(loop, len(inputs))
        self._reserved += len(inputs)
        reserved = len(inputs)
        try:
            async with asyncio.timeout(timeout):
                began = time.perf_counter()
                entries = await loop.run_in_executor(self._tokenizers, self._entries, inputs, pending)
                tokenize_s = time.perf_counter() - began
                self.observer.tokenized(tokenize_s)
                if self.failure is not None:
                    raise self._dead()
                self._queue.extend(entries)
                self._inflight.add(pending)
                self._reserved -= reserved
                reserved = 0
                self._refill()
                rewards = await pending.future
        except TimeoutError:
            deadline = stated if stated is not None else timeout
            raise DeadlineExceeded(
                f"not scored within the request's deadline of {deadline:g} s; its items were dropped"
            ) from None
        finally:
            if reserved:  # refused or cancelled before its items were queued
                self._reserved -= reserved
                self._refill()  # a stopping worker may be waiting for these
            self._inflight.discard(pending)
            pending.future.cancel()  # its queued items, if any, are abandoned
        started = pending.started if pending.started is not None else time.perf_counter()
        timing = Timing(tokenize_s, started - pending.enqueued, pending.inference_s)
        self.observer.started(timing.queue_s)
        results = [ItemResult(r, len(e.encoded), e.encoded.truncated) for r, e in zip(rewards, entries, strict=True)]
        return Scored(results, timing)

    def _entries(self, inputs: list[Item], pending: Pending) -> list[_Entry]:
        """Tokenizer thread: the queue entries of one request's items."""
        try:
            encoded = self.model.encoder.encode_batch(inputs, chunk_chars=self.settings.tokenize_chunk_chars)
        except UnreadableItem as exc:
            raise InputRejected(f"item {exc.index}: {exc.reason}", index=exc.index) from exc
        empty = next((i for i, e in enumerate(encoded) if not e.input_ids), None)
        if empty is not None:  # e.g. an empty raw query with a tokenizer that adds no special tokens
            raise InputRejected(f"item {empty} has no tokens to score (empty text)", index=empty)
        return [_Entry(e, i, pending) for i, e in enumerate(encoded)]

    def _refill(self) -> None:
        """Loop: (re)plan the plan the model thread will take next, with everything queued so far; when stopping
        and nothing is left, tell the thread to end."""
        if self.failure is not None or self._loop is None:
            return
        self._reclaim()
        dropped = self._queue.dropped
        planned = self._queue.next_plan()
        if self._queue.dropped > dropped:
            self.observer.dropped(self._queue.dropped - dropped)
        if planned is not None or (self._stopping and not self._reserved):
            self._handoff.offer(planned)  # None: the thread ends
            self._offered = len(planned[0]) if planned else 0

    def _reclaim(self) -> None:
        """Loop: an offered plan not taken yet goes back to the queue's front (to grow, or be pruned)."""
        waiting, self._offered = self._handoff.reclaim(), 0
        if waiting is not None:
            self._queue.requeue(waiting[0])

    # ---- model path (inference thread) ------------------------------------------------------------
    def _run(self, warmed: Future[None]) -> None:
        try:
            self._prepare()
        except Exception as exc:  # noqa: BLE001 (`start` raises it again, on the loop)
            if not warmed.cancelled():  # `start` gave up waiting (the lifespan's own timeout)
                warmed.set_exception(exc)
            return
        warmed.set_result(None)
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 (outside any plan's own handling: this thread cannot go on)
            self._die(exc)

    def _prepare(self) -> None:
        """Measures how the model runs plans (`RewardModel.prepare`), with this thread's CPU threads."""
        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        measured = (self.settings.cache_dir or default_cache_dir()) / "kernels"
        kernels = self.model.prepare(self.settings.batch_invariant, self.settings.block_rows, measured)
        policy = BatchPolicy(self.settings.max_batch_tokens, self.settings.max_batch_size, kernels.layout == "packed")
        policy.check(self.model.max_length)
        self._queue.policy = policy
        log.debug("kernels: %s", kernels.model_dump_json())  # /info has them; the start-up line sums them up

    def _die(self, exc: BaseException) -> None:
        """Fail fast instead of letting callers wait out their deadlines: not ready, every admitted request answered
        503, health failing (so an orchestrator or Ray replaces the process)."""
        log.critical("the model thread died", exc_info=exc)
        self.failure = f"{type(exc).__name__}: {exc}"
        self.ready = False
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail_all)
        if self.on_death is not None:
            self.on_death()

    def _fail_all(self) -> None:
        for pending in self._inflight:
            pending.fail(self._dead())

    def _dead(self) -> NotReady:
        return NotReady(f"the model thread died ({self.failure}); the service must be restarted")

    def _serve(self) -> None:
        assert self._loop is not None
        while (planned := self._handoff.take()) is not None:
            self._loop.call_soon_threadsafe(self._refill)  # the next plan is made while this one runs
            self._run_plan(*planned)
            if not self._handoff.holding:
                self._trimmer.idle()

    def _run_plan(self, batch: list[_Entry], plan: Plan) -> None:
        """Run `plan`; on failure (e.g. out of memory) retry its halves, down to single items."""
        live = [e for e in batch if not e.abandoned]
        if len(live) < len(batch):  # left while the plan waited: not computed
            self.observer.dropped(len(batch) - len(live))
            batch, plan = live, self._queue.replan(live)
        if not batch:
            return
        began = time.perf_counter()
        requests = {id(e.pending): e.pending for e in batch}.values()
        for pending in requests:
            if pending.started is None:
                pending.started = began
        try:
            outputs = self.model.run(plan)
        except Exception as exc:  # any backend failure: split, retry, then fail only the culprit
            if len(batch) > 1:
                log.warning("forward failed for a plan of %d (%s); retrying its halves", len(batch), exc)
                half = len(batch) // 2
                self._run_plan(batch[:half], self._queue.replan(batch[:half]))
                self._run_plan(batch[half:], self._queue.replan(batch[half:]))
                return
            log.exception("forward failed for a single item")
            batch[0].pending.fail(BackendFailed(f"the model failed on this item: {type(exc).__name__}"))
            return
        seconds = time.perf_counter() - began
        self._record(len(batch), plan.real_tokens, plan.cost, seconds)
        for pending in requests:
            pending.inference_s += seconds
        for entry, row in zip(batch, outputs, strict=True):
            bad = next((value for value in row if not math.isfinite(value)), None)
            if bad is None:
                entry.pending.record(entry.index, row)
            else:  # never let NaN/inf out as a number (it is not valid JSON) nor hide it
                message = f"the model produced a non-finite reward ({bad}) for item {entry.index}"
                entry.pending.fail(BackendFailed(message, index=entry.index))

    def _record(self, items: int, real: int, computed: int, seconds: float) -> None:
        stats = self.stats  # `real`: the items' tokens (a shared prompt once); `computed`: the rows the linears ran
        stats.batches += 1
        stats.items += items
        stats.real_tokens += real
        stats.padded_tokens += computed
        stats.batch_sizes = [*stats.batch_sizes[-999:], items]
        self.observer.batch(items, real, computed, seconds)
