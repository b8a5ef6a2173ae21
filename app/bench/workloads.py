"""The benchmark's workloads (real prompt and reply lengths from a preference file), what one run measured, and the
`engine` mode: the model forward alone, the limit the server is measured against."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.offline import score_offline
from app.model.plan import Plan
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel
from app.training.data import PreferencePair


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
    hostile_statuses: dict[int, int] = field(default_factory=dict)  # `hostile`: what the hostile bodies got
    monitor_seconds: float = 0.0  # this service: the event-loop time its reward-hacking monitor took

    def row(self, roofline_tokens: float | None = None) -> dict[str, Any]:
        """`roofline_tokens`: own tokens/s at the matmul roofline (`roofline`), for the useful-work fraction."""
        q = statistics.quantiles(self.latencies, n=100, method="inclusive") if len(self.latencies) > 1 else None
        return {
            "mode": self.mode,
            "items/s": self.items / self.seconds,
            "tokens/s": self.item_tokens / self.seconds,
            "roofline": self.item_tokens / self.seconds / roofline_tokens if roofline_tokens else None,
            "padding efficiency": self.real_tokens / self.padded_tokens if self.padded_tokens else None,
            "mean batch": self.items / self.batches if self.batches else None,
            "p50 ms": 1000 * (q[49] if q else self.latencies[0]) if self.latencies else None,
            "p95 ms": 1000 * q[94] if q else None,
            "p99 ms": 1000 * q[98] if q else None,
        }


# ---- workloads -------------------------------------------------------------------------------------


_WORDS = (  # noqa: SIM905 (one sentence reads better than a list of 60 words)
    "the model reads a prompt and a reply and returns one reward higher is better when the answer is helpful honest "
    "and correct so a trainer can rank many samples for each question about science history code cooking travel "
    "health money law language music sports weather and everyday life with care detail examples and clear steps"
).split()


def synthetic_pairs(count: int = 48, seed: int = 0) -> list[PreferencePair]:
    """Preference pairs of plain words with the length spread of human-judged data (prompts median ~50 words, replies
    ~30, long tails): the benchmark's workload where no data file is given and `../shared` is absent."""
    rng = random.Random(seed)

    def text(median_words: float) -> str:
        n = max(3, int(rng.lognormvariate(math.log(median_words), 0.8)))
        return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."

    return [PreferencePair(text(50), text(30), text(30)) for _ in range(count)]


def build_workloads(
    model: RewardModel, data: Path | None, prompts: int, group: int, clients: int, idle_items: int, seed: int
) -> dict[str, Workload]:
    """`data`: a preference file, or None for `synthetic_pairs`."""
    from app.training.data import load_pairs

    pairs = load_pairs(data) if data is not None else synthetic_pairs(seed=seed)
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
    workloads = {
        "grpo": Workload("grpo", [grpo], 1),
        "storm": Workload("storm", [[x] for x in grpo], clients),
        "hostile": Workload("hostile", [[x] for x in grpo], clients),  # the storm, with `bench.hostile` alongside
        "shared": Workload("shared", [shared], 1),
        "idle": Workload("idle", [[x] for x in grpo[:: max(1, len(grpo) // idle_items)][:idle_items]], 1),
    }
    if (rule := model.readout.steps) is not None:  # `prm`: 8 problems x 8 solutions of 6-12 steps, a request each
        budget = model.max_length // 2 // 13  # tokens a step: 12 steps and their tags fit, the prompt beside them
        sentences = list(
            dict.fromkeys(" ".join(s.split()) for r in replies for s in r.split(".") if len(s.split()) > 3)
        )
        steps = [_fit(s.split(), budget, tokens) for s in rng.sample(sentences, min(len(sentences), 200))]
        solutions = [rule.split.join(rng.sample(steps, rng.randint(6, 12))) for _ in range(64)]
        problems = rng.sample([t for t in texts if tokens(t) < model.max_length // 3], 8)
        prm = [[ScoringInput(p, s) for s in solutions[8 * i : 8 * i + 8]] for i, p in enumerate(problems)]
        workloads["prm"] = Workload("prm", prm, 8)
    return workloads


def _fit(words: list[str], budget: int, tokens: Callable[[str], int]) -> str:
    """The sentence's first words, under `budget` tokens (three words at least), as one step."""
    while len(words) > 3 and tokens(" ".join(words) + ".") >= budget:
        words = words[: max(3, len(words) * 3 // 4)]
    return " ".join(words) + "."


# ---- engine ----------------------------------------------------------------------------------------


def run_engine(model: RewardModel, workload: Workload) -> Result:
    items = workload.items
    encoded = model.encoder.encode_batch(items)
    tokens = sum(len(e) for e in encoded)
    if workload.one_at_a_time:
        latencies = [one_forward(model, x) for x in items]
        return Result(
            "engine", workload.name, len(items), sum(latencies), tokens, latencies, tokens, tokens, len(items)
        )
    planned: list[Plan] = []
    began = time.perf_counter()
    score_offline(model, items, on_plan=planned.append)
    seconds = time.perf_counter() - began
    real = sum(p.real_tokens for p in planned)
    padded = sum(p.cost for p in planned)
    return Result("engine", workload.name, len(items), seconds, tokens, [seconds], real, padded, len(planned))


def one_forward(model: RewardModel, item: ScoringInput) -> float:
    """Seconds of one forward of `item` alone, tokenized beforehand: what `idle` latency is compared with."""
    encoded = model.encoder.encode_batch([item])
    began = time.perf_counter()
    model.score(encoded)
    return time.perf_counter() - began
