"""Scoring a known list of items (evaluation, benchmarks) with the serving batcher, without the model thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.engine.batching import BatchPolicy, TokenBudgetQueue
from app.model.fingerprint import scoring_fingerprint
from app.model.info import ModelInfo
from app.model.plan import Plan, prompt_of
from app.model.recipe import Encoded, Item
from app.model.reward_model import RewardModel

OFFLINE_TOKENS, OFFLINE_ITEMS = 8192, 64


@dataclass(slots=True)
class Queued:
    """An encoded item as the batcher sees it; `index` is the caller's handle."""

    encoded: Encoded
    index: int
    prompt: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt = prompt_of(self.encoded)

    @property
    def abandoned(self) -> bool:
        return False


def policy_for(
    model: RewardModel, max_batch_tokens: int = OFFLINE_TOKENS, max_batch_size: int = OFFLINE_ITEMS
) -> BatchPolicy:
    """The batch policy for `model`'s layout; the budget at least one full-length item."""
    return BatchPolicy(max(max_batch_tokens, model.max_length), max_batch_size, model.packs)


def served_fingerprint(
    model: RewardModel, normalization: dict[str, float] | None = None, info: ModelInfo | None = None
) -> str:
    """The fingerprint of scoring `model` as prepared (`RewardModel.prepare`) with this normalization: what a server
    reports, and what an offline scorer prepared the same way records. `info`: a shared-base member's own."""
    of = (info or model.info).model_fingerprint
    return scoring_fingerprint(of, model.prepared.fingerprint_part(), normalization)


def score_offline(
    model: RewardModel,
    inputs: Sequence[Item],
    max_batch_tokens: int = OFFLINE_TOKENS,
    max_batch_size: int = OFFLINE_ITEMS,
    on_plan: Callable[[Plan], None] | None = None,
) -> list[float]:
    """Rewards of `inputs`, in order, planned as the server plans them (shortest first here: a known list);
    `on_plan` sees each plan (the benchmark counts its tokens)."""
    return [
        model.readout.reward(row) for row in outputs_offline(model, inputs, max_batch_tokens, max_batch_size, on_plan)
    ]


def outputs_offline(
    model: RewardModel,
    inputs: Sequence[Item],
    max_batch_tokens: int = OFFLINE_TOKENS,
    max_batch_size: int = OFFLINE_ITEMS,
    on_plan: Callable[[Plan], None] | None = None,
) -> list[list[float]]:
    """`score_offline`, each item's whole row of outputs (a shared-base model's: every member's reward)."""
    encoded = model.encoder.encode_batch(list(inputs))
    queue: TokenBudgetQueue[Queued] = TokenBudgetQueue(policy_for(model, max_batch_tokens, max_batch_size))
    queue.extend(Queued(encoded[i], i) for i in sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
    rows: list[list[float]] = [[] for _ in encoded]
    while planned := queue.next_plan():
        batch, plan = planned
        if on_plan is not None:
            on_plan(plan)
        for q, row in zip(batch, model.run(plan), strict=True):
            rows[q.index] = row
    return rows
