"""`reward-server bench`: throughput and latency under trainer traffic, beside the limit and the peers, in one run.

Workloads (items from a preference file, so lengths are real):
- `grpo`: one request of P prompts x G replies (TRL);
- `storm`: the same items as single-item requests from C concurrent clients (OpenRLHF, verl);
- `shared`: like `grpo`, with prompts about 4x longer than replies (what shared-prompt reuse is for);
- `idle`: one single-item request at a time (latency).

Modes, on the same checkpoint and dtype:
- `engine`: the model forward over the workload's items, length-sorted token-budget batches, no HTTP, no prompt
  sharing: the limit the server is measured against;
- `server`: this service over HTTP (`server-plain`: with REWARD_SHARE_PREFIXES=false);
- `naive`: a minimal FastAPI server running one forward per request, padded to its longest item (OpenRLHF
  `serve_rm.py`);
- `litserve`: LitServe with its dynamic batching (max_batch_size 16, 10 ms), one padded forward per batch;
- `ray`: this service on Ray Serve, one replica holding every core (the Ray path's overhead); `ray-2`: two replicas
  splitting the cores (how throughput grows with replicas).
Servers run in their own processes on 127.0.0.1; only one runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from app.ml.collate import Batch, SharedBatch
from app.ml.recipe import ScoringInput
from app.ml.reward_model import OFFLINE, RewardModel

MODES = ("engine", "server", "server-plain", "naive", "litserve", "ray", "ray-2")
WORKLOADS = ("grpo", "storm", "shared", "idle")


@dataclass
class Workload:
    name: str
    requests: list[list[ScoringInput]]
    concurrency: int

    @property
    def items(self) -> list[ScoringInput]:
        return [x for r in self.requests for x in r]

    @property
    def one_at_a_time(self) -> bool:
        """`idle`: single-item requests in sequence, whose latency is compared with one forward of the item."""
        return self.concurrency == 1 and all(len(r) == 1 for r in self.requests)


@dataclass
class Result:
    mode: str
    workload: str
    items: int
    seconds: float
    item_tokens: int  # sum of the items' own lengths: the useful work, whatever was shared or padded
    latencies: list[float] = field(default_factory=list)
    real_tokens: int | None = None  # computed by the forward passes (a shared prompt once)
    padded_tokens: int | None = None
    batches: int | None = None
    forwards: list[float] = field(default_factory=list)  # `idle`: the item's in-process forward, just before each
    served_forwards: list[float] = field(default_factory=list)  # the server's own forward time (x-inference-time-ms)

    def row(self) -> dict[str, Any]:
        q = statistics.quantiles(self.latencies, n=100, method="inclusive") if len(self.latencies) > 1 else None
        return {
            "mode": self.mode,
            "items/s": self.items / self.seconds,
            "tokens/s": self.item_tokens / self.seconds,
            "padding efficiency": self.real_tokens / self.padded_tokens if self.padded_tokens else None,
            "mean batch": self.items / self.batches if self.batches else None,
            "p50 ms": 1000 * (q[49] if q else self.latencies[0]) if self.latencies else None,
            "p95 ms": 1000 * q[94] if q else None,
            "p99 ms": 1000 * q[98] if q else None,
        }


# ---- workloads -------------------------------------------------------------------------------------


def build_workloads(
    model: RewardModel, data: Path, prompts: int, group: int, clients: int, idle_items: int, seed: int
) -> dict[str, Workload]:
    from app.ml.data import load_pairs

    pairs = load_pairs(data)
    rng = random.Random(seed)
    replies = [r for p in pairs for r in (p.chosen, p.rejected) if isinstance(r, str)]
    texts = [p.prompt for p in pairs if isinstance(p.prompt, str)]
    grpo = [ScoringInput(p, r) for p in rng.sample(texts, prompts) for r in rng.sample(replies, group)]

    def tokens(text: str) -> int:
        return len(model.encoder.tokenizer(text, add_special_tokens=False).input_ids)

    # `shared`: prompts near 60% of the checkpoint's max_length, replies near a quarter of that
    target = int(0.6 * model.max_length)
    long_prompts = sorted(set(texts), key=lambda t: abs(tokens(t) - target))[:prompts]
    short = sorted(set(replies), key=lambda t: abs(tokens(t) - target // 4))[: 4 * group]
    shared = [ScoringInput(p, r) for p in long_prompts for r in rng.sample(short, group)]
    return {
        "grpo": Workload("grpo", [grpo], 1),
        "storm": Workload("storm", [[x] for x in grpo], clients),
        "shared": Workload("shared", [shared], 1),
        "idle": Workload("idle", [[x] for x in grpo[:: max(1, len(grpo) // idle_items)][:idle_items]], 1),
    }


# ---- engine ----------------------------------------------------------------------------------------


def run_engine(model: RewardModel, workload: Workload) -> Result:
    plain = replace(OFFLINE, share_prefixes=False)
    items = workload.items
    encoded = model.encoder.encode_batch(items)
    tokens = sum(len(e) for e in encoded)
    if workload.one_at_a_time:
        latencies = [one_forward(model, x) for x in items]
        return Result(
            "engine", workload.name, len(items), sum(latencies), tokens, latencies, tokens, tokens, len(items)
        )
    planned: list[Batch | SharedBatch] = []
    began = time.perf_counter()
    model.score_inputs(items, plain, planned.append)
    seconds = time.perf_counter() - began
    real = sum(b.real_tokens for b in planned)
    padded = sum(b.padded_tokens for b in planned)
    return Result("engine", workload.name, len(items), seconds, tokens, [seconds], real, padded, len(planned))


def one_forward(model: RewardModel, item: ScoringInput) -> float:
    """Seconds of one forward of `item` alone, tokenized beforehand: what `idle` latency is compared with."""
    encoded = model.encoder.encode_batch([item])
    began = time.perf_counter()
    model.score(encoded, OFFLINE.pad_to_multiple_of, share=False)
    return time.perf_counter() - began


# ---- HTTP modes ------------------------------------------------------------------------------------


def _wire(items: Sequence[ScoringInput]) -> dict[str, Any]:
    return {"items": [{"prompt": x.prompt, "response": x.response} for x in items]}


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
                response = await client.post(url, json=_wire(request))
                response.raise_for_status()
                latencies.append(time.perf_counter() - began)
                if "x-inference-time-ms" in response.headers:
                    forwards.append(float(response.headers["x-inference-time-ms"]) / 1000)

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(workload.concurrency)))
        return time.perf_counter() - began - spent, latencies, forwards


def _counters(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    wanted = ("reward_tokens_scored_total", "reward_padded_tokens_total", "reward_batch_size_count")
    return {
        name: float(line.split()[-1]) for line in text.splitlines() for name in wanted if line.startswith(name + " ")
    }


class Served:
    """One server process for one mode; stopped on exit."""

    def __init__(self, mode: str, model_path: Path, dtype: str, port: int, log: Path) -> None:
        self.mode, self.base = mode, f"http://127.0.0.1:{port}"
        env = {**os.environ, "REWARD_MODEL_PATH": str(model_path), "REWARD_DTYPE": dtype, "REWARD_PORT": str(port)}
        if mode.startswith(("server", "ray")):  # this service: `reward-server serve`, plainly or on Ray
            env.update(REWARD_LOG_LEVEL="warning", REWARD_SHARE_PREFIXES=str(mode != "server-plain").lower())
            command = [sys.executable, "-m", "app.cli", "serve"]
            self.url = f"{self.base}/score"
            if mode.startswith("ray"):  # a local Ray cluster of this machine's cores, split over the replicas
                replicas = 2 if mode == "ray-2" else 1
                cores = os.cpu_count() or 1
                env.update(REWARD_RAY_REPLICAS=str(replicas), REWARD_RAY_NUM_CPUS=str(max(1, cores // replicas)))
                env.update(RAY_DISABLE_DOCKER_CPU_WARNING="1")
                command.append("--ray")
        else:
            command = [sys.executable, "-m", "app.peers", mode, str(model_path), dtype, str(port)]
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
                ready = httpx.get(f"{self.base}/health", timeout=5).status_code == 200
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

    def run(self, model: RewardModel, workload: Workload) -> Result:
        encoded = model.encoder.encode_batch(workload.items)
        tokens = sum(len(e) for e in encoded)
        exact = self.mode.startswith("server") or self.mode == "ray"  # ray-2: /metrics is one replica's
        before = _counters(self.base) if exact else {}
        forwards: list[float] = []
        # idle: the item's own forward, in this process just before its request, as the reference to compare its
        # latency with (measured side by side, so the machine's drift between modes does not enter the difference)
        paired = (lambda r: forwards.append(one_forward(model, r[0]))) if workload.one_at_a_time else None
        seconds, latencies, served = asyncio.run(drive(self.url, workload, paired))
        result = Result(self.mode, workload.name, len(encoded), seconds, tokens, latencies, forwards=forwards)
        if workload.one_at_a_time:
            result.served_forwards = served
        if before:
            after = _counters(self.base)
            result.real_tokens = int(after["reward_tokens_scored_total"] - before["reward_tokens_scored_total"])
            result.padded_tokens = int(after["reward_padded_tokens_total"] - before["reward_padded_tokens_total"])
            result.batches = int(after["reward_batch_size_count"] - before["reward_batch_size_count"])
        elif self.mode == "naive":  # one forward per request, padded to its longest item
            lengths = iter(len(e) for e in encoded)
            sizes = [[next(lengths) for _ in r] for r in workload.requests]
            result.real_tokens, result.batches = tokens, len(sizes)
            result.padded_tokens = sum(len(s) * max(s) for s in sizes)
        return result


# ---- report ----------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


def report(results: list[Result], header: str) -> str:
    lines = [header, ""]
    by = {(r.workload, r.mode): r for r in results}
    for workload in dict.fromkeys(r.workload for r in results):
        rows = [by[workload, m].row() for m in MODES if (workload, m) in by]
        cols = list(rows[0])
        lines += [f"### {workload}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in rows]
        lines.append("")
    lines += ["### ratios (items/s)", "", "| workload | ratio | value |", "|---|---|---|"]
    pairs = [("server", other) for other in ("engine", "server-plain", "naive", "litserve")]
    pairs += [(ray_mode, "server") for ray_mode in ("ray", "ray-2")]  # the Ray path against the single process
    for workload in dict.fromkeys(r.workload for r in results):
        for mode, other in pairs:
            if (workload, mode) in by and (workload, other) in by and workload != "idle":
                a, b = by[workload, mode], by[workload, other]
                lines.append(f"| {workload} | {mode} / {other} | {(a.items / a.seconds) / (b.items / b.seconds):.2f} |")
    for r in results:
        if r.forwards:  # paired: each request against its item's forward run just before it
            extra = statistics.median(a - b for a, b in zip(r.latencies, r.forwards, strict=True))
            lines.append(f"| {r.workload} | {r.mode} p50 of (latency - the item's forward) | {1000 * extra:+.1f} ms |")
        if r.served_forwards:  # this service reports its forward time: the rest is HTTP, queueing, tokenizing
            extra = statistics.median(a - b for a, b in zip(r.latencies, r.served_forwards, strict=True))
            lines.append(f"| {r.workload} | {r.mode} p50 of (latency - its own forward) | {1000 * extra:+.1f} ms |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", type=Path, default=Path("models/default"), help="checkpoint directory")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/preferences/dev.jsonl"))
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has it), float32, bfloat16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="replies per prompt")
    parser.add_argument("--clients", type=int, default=32, help="storm: concurrent clients")
    parser.add_argument("--idle-items", type=int, default=24)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--port", type=int, default=18321)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the markdown table and raw results here (.md and .json)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="reward-server bench", description=__doc__))


def run(args: argparse.Namespace) -> int:
    import platform

    import torch

    from app.ml.loading import load_reward_model

    model = load_reward_model(args.model, dtype=args.dtype)
    workloads = build_workloads(model, args.data, args.prompts, args.group, args.clients, args.idle_items, args.seed)
    chosen = [workloads[w] for w in args.workloads.split(",")]
    modes = args.modes.split(",")
    results: list[Result] = []
    if "engine" in modes:
        results += [run_engine(model, w) for w in chosen]
    for i, mode in enumerate(m for m in modes if m != "engine"):
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"reward-bench-{mode}.log"
        # a port per mode: a stopping server (Ray's proxy binds with SO_REUSEPORT) never answers for the next one
        with Served(mode, args.model, args.dtype, args.port + i, log) as served:
            results += [served.run(model, w) for w in chosen]
        print(f"{mode}: done", file=sys.stderr)
    header = (
        f"{args.model} ({model.info['architecture']}, {model.info['dtype']}, {model.info['device']}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"{torch.get_num_threads()} threads; {args.prompts} prompts x {args.group} replies from {args.data.name}, "
        f"storm with {args.clients} clients"
    )
    text = report(results, header)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        raw = [{**asdict(r), **r.row()} for r in results]
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "results": raw}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
