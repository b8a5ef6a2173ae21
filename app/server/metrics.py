"""Prometheus metrics, one registry per app (no process-global state), exposed at `/metrics`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.engine.observer import EngineObserver
from app.server.signals import SIGNALS

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics(EngineObserver):
    """The HTTP layer's counters, and the engine's events as Prometheus sees them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("reward_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("reward_errors", "Error responses by type", ["type"], registry=r)
        self.items = Counter("reward_items_scored", "Items scored", registry=r)
        self.tokens = Counter(
            "reward_tokens_scored", "Real (unpadded) tokens computed; a shared prompt counts once", registry=r
        )
        self.padded_tokens = Counter("reward_padded_tokens", "Padded tokens computed", registry=r)
        self.dropped_items = Counter("reward_items_dropped", "Queued items dropped unscored (caller gone)", registry=r)
        self.queue_depth = Gauge("reward_queue_depth", "Items waiting for the models, all together", registry=r)
        self._depths: list[Callable[[], int]] = []
        self.queue_depth.set_function(lambda: float(sum(depth() for depth in self._depths)))
        self.batch_size = Histogram("reward_batch_size", "Items per forward pass", buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("reward_batch_tokens", "Padded tokens per forward", buckets=_TOKENS, registry=r)
        self.padding_efficiency = Histogram(
            "reward_padding_efficiency",
            "Real / padded tokens per batch",
            buckets=(0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.tokenize_seconds = Histogram(
            "reward_tokenize_seconds", "Tokenization per request", buckets=_SECONDS, registry=r
        )
        self.queue_seconds = Histogram(
            "reward_queue_seconds", "Wait before the first forward of a request", buckets=_SECONDS, registry=r
        )
        self.forward_seconds = Histogram(
            "reward_forward_seconds", "Forward pass per batch", buckets=_SECONDS, registry=r
        )
        self.monitor_signal = Gauge(
            "reward_monitor_signal", "A run's last closed monitor window: each signal", ["run", "signal"], registry=r
        )
        self.monitor_warnings = Gauge(
            "reward_monitor_warnings", "Warnings in force for a run (its last closed window)", ["run"], registry=r
        )
        self.monitor_seconds = Counter(
            "reward_monitor_seconds", "Event-loop time the reward-hacking monitor took (its cost)", registry=r
        )
        self.request_seconds = Histogram(
            "reward_request_seconds",
            "Request latency, body read to response end",
            ["route"],
            buckets=_SECONDS,
            registry=r,
        )

    def monitor_window(self, run: str, signals: dict[str, float | None], warnings: int) -> None:
        for name, value in signals.items():
            if value is not None:
                self.monitor_signal.labels(run=run, signal=name).set(value)
        self.monitor_warnings.labels(run=run).set(warnings)

    def monitor_spent(self, seconds: float) -> None:
        self.monitor_seconds.inc(seconds)

    def monitor_forget(self, run: str) -> None:
        for name in SIGNALS:
            with contextlib.suppress(KeyError):
                self.monitor_signal.remove(run, name)
        with contextlib.suppress(KeyError):
            self.monitor_warnings.remove(run)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self._depths.append(depth)

    def tokenized(self, seconds: float) -> None:
        self.tokenize_seconds.observe(seconds)

    def started(self, queue_seconds: float) -> None:
        self.queue_seconds.observe(queue_seconds)

    def dropped(self, items: int) -> None:
        self.dropped_items.inc(items)

    def batch(self, size: int, real: int, padded: int, seconds: float) -> None:
        self.items.inc(size)
        self.tokens.inc(real)
        self.padded_tokens.inc(padded)
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded)
        self.padding_efficiency.observe(real / padded if padded else 1.0)
        self.forward_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
