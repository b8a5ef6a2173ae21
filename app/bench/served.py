"""The HTTP modes: one server process per mode on 127.0.0.1 (this service, plainly or on Ray, or a peer), driven by
concurrent clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.bench.hostile import pester
from app.bench.workloads import Result, Workload, one_forward
from app.clients.wire import to_item
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel


async def drive(
    url: str, workload: Workload, before: Callable[[list[ScoringInput]], None] | None = None
) -> tuple[float, list[float], list[float]]:
    """Send every request, `concurrency` at a time, `before` each (blocking); (wall seconds with `before`
    excluded, per-request latencies, the server's own forward seconds where it reports them)."""
    queue: asyncio.Queue[list[ScoringInput]] = asyncio.Queue()
    for request in workload.requests:
        queue.put_nowait(request)
    latencies: list[float] = []
    forwards: list[float] = []
    spent = 0.0  # in `before`: not the server's time
    limits = httpx.Limits(max_connections=workload.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one_client() -> None:
            nonlocal spent
            while not queue.empty():
                request = queue.get_nowait()
                if before is not None:
                    began = time.perf_counter()
                    before(request)
                    spent += time.perf_counter() - began
                began = time.perf_counter()
                response = await client.post(url, json={"items": [to_item(x.prompt, x.response) for x in request]})
                response.raise_for_status()
                latencies.append(time.perf_counter() - began)
                if "x-inference-time-ms" in response.headers:
                    forwards.append(float(response.headers["x-inference-time-ms"]) / 1000)

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(workload.concurrency)))
        return time.perf_counter() - began - spent, latencies, forwards


def _counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    wanted = (
        "reward_tokens_scored_total",
        "reward_padded_tokens_total",
        "reward_batch_size_count",
        "reward_monitor_seconds_total",
    )
    return {
        name: float(line.split()[-1]) for line in text.splitlines() for name in wanted if line.startswith(name + " ")
    }


class Served:
    """One server process for one mode; stopped on exit."""

    def __init__(self, mode: str, model_path: Path, dtype: str, port: int, log: Path) -> None:
        self.mode, self.base = mode, f"http://127.0.0.1:{port}"
        self.probe = "/ready" if mode.startswith(("server", "ray")) else "/health"  # ours answer /health while loading
        env = {**os.environ, "REWARD_MODEL_PATH": str(model_path), "REWARD_DTYPE": dtype, "REWARD_PORT": str(port)}
        if mode.startswith(("server", "ray")):  # this service: `reward-server serve`, plainly or on Ray
            env.update(REWARD_LOG_LEVEL="warning", REWARD_BATCH_INVARIANT=str(mode != "server-stock").lower())
            env.update(REWARD_MONITOR=str(mode != "server-unmonitored").lower())
            command = [sys.executable, "-m", "app.cli", "serve"]
            self.url = f"{self.base}/score"
            if mode.startswith("ray"):  # a local Ray cluster of this machine's cores, split over the replicas
                replicas = 2 if mode == "ray-2" else 1
                cores = os.cpu_count() or 1
                env.update(REWARD_RAY_REPLICAS=str(replicas), REWARD_RAY_NUM_CPUS=str(max(1, cores // replicas)))
                env.update(RAY_DISABLE_DOCKER_CPU_WARNING="1")
                command.append("--ray")
        else:
            command = [sys.executable, "-m", "app.bench.peers", mode, str(model_path), dtype, str(port)]
            self.url = f"{self.base}/predict" if mode == "litserve" else f"{self.base}/score"
        self.log = log.open("w")
        self.proc = subprocess.Popen(  # its own process group: LitServe starts worker processes of its own
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def __enter__(self) -> Served:
        try:
            return self._wait_ready()
        except BaseException:
            self.__exit__()
            raise

    def _wait_ready(self) -> Served:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.mode} server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                ready = httpx.get(f"{self.base}{self.probe}", timeout=5).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                asyncio.run(drive(self.url, Workload("warm", [[ScoringInput("Hello", "Hi there.")]], 1)))
                return self
            time.sleep(0.5)
        raise RuntimeError(f"{self.mode} server did not start in 120 s; see {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        if self.mode.startswith("ray"):  # the CLI stops the Ray cluster it started; its raylet must not die first
            self.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    async def _drive(
        self, workload: Workload, before: Callable[[list[ScoringInput]], None] | None
    ) -> tuple[tuple[float, list[float], list[float]], dict[int, int]]:
        """`drive`, with `pester` sending hostile bodies alongside for the `hostile` workload; what they got."""
        if workload.name != "hostile":
            return await drive(self.url, workload, before), {}
        stop = asyncio.Event()
        pest = asyncio.create_task(pester(self.url, stop))
        try:
            driven = await drive(self.url, workload, before)
        finally:
            stop.set()
            statuses = await pest
        return driven, statuses

    def run(self, model: RewardModel, workload: Workload) -> Result:
        encoded = model.encoder.encode_batch(workload.items)
        tokens = sum(len(e) for e in encoded)
        exact = self.mode.startswith("server") or self.mode == "ray"  # ray-2: /metrics is one replica's
        before = _counters(self.base) if exact else {}
        forwards: list[float] = []
        # idle: the item's own forward, in this process just before its request, as the reference to compare its
        # latency with (measured side by side, so the machine's drift between modes does not enter the difference)
        paired = (lambda r: forwards.append(one_forward(model, r[0]))) if workload.one_at_a_time else None
        (seconds, latencies, served), hostile = asyncio.run(self._drive(workload, paired))
        result = Result(self.mode, workload.name, len(encoded), seconds, tokens, latencies, forwards=forwards)
        result.hostile_statuses = hostile
        if workload.one_at_a_time:
            result.served_forwards = served
        if before:
            after = _counters(self.base)
            result.real_tokens = int(after["reward_tokens_scored_total"] - before["reward_tokens_scored_total"])
            result.padded_tokens = int(after["reward_padded_tokens_total"] - before["reward_padded_tokens_total"])
            result.batches = int(after["reward_batch_size_count"] - before["reward_batch_size_count"])
            result.monitor_seconds = after["reward_monitor_seconds_total"] - before["reward_monitor_seconds_total"]
        elif self.mode == "naive":  # one forward per request, padded to its longest item
            lengths = iter(len(e) for e in encoded)
            sizes = [[next(lengths) for _ in r] for r in workload.requests]
            result.real_tokens, result.batches = tokens, len(sizes)
            result.padded_tokens = sum(len(s) * max(s) for s in sizes)
        return result
