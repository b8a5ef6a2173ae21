"""Scoring a known list of items (evaluation, benchmarks) with the serving batch policy, without the model thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from app.engine.batching import BatchPolicy, TokenBudgetQueue
from app.model.collate import Batch, SharedBatch
from app.model.fingerprint import scoring_fingerprint
from app.model.packed import PackedBatch
from app.model.recipe import Encoded, Item
from app.model.reward_model import RewardModel

OFFLINE = BatchPolicy(
    max_batch_tokens=8192, max_batch_size=64, pad_to_multiple_of=16, min_padding_efficiency=0.8, lookahead=4096
)


@dataclass(slots=True)
class Queued:
    """An encoded item as the batching policy sees it; `index` is the caller's handle."""

    encoded: Encoded
    index: int
    prefix_key: int | None = field(init=False)

    def __post_init__(self) -> None:
        e = self.encoded  # a hash is enough: `collate_shared` groups by the tokens themselves
        self.prefix_key = hash(tuple(e.input_ids[: e.prefix])) if e.prefix else None

    @property
    def abandoned(self) -> bool:
        return False

    @property
    def length(self) -> int:
        return len(self.encoded.input_ids)

    @property
    def prefix(self) -> int:
        return self.encoded.prefix


def served_fingerprint(
    model: RewardModel,
    policy: BatchPolicy = OFFLINE,
    normalization: dict[str, float] | None = None,
    threads: int | None = None,
) -> str:
    """The fingerprint of scoring `model` with `policy` (fitted to it here) and this normalization: what a server
    reports, and what an offline scorer with the same policy and raw rewards records. `threads`: the CPU threads of
    the thread that runs the model (OpenMP's count is per thread; default: this one's)."""
    fitted = policy.for_model(model)
    if model.device_type != "cpu":
        threads = None
    elif threads is None:
        threads = torch.get_num_threads()
    return scoring_fingerprint(
        model.info["fingerprint"],
        share_prefixes=fitted.share_prefixes,
        pad_to_multiple_of=fitted.pad_to_multiple_of,
        block_rows=fitted.invariant_rows,
        threads=threads,
        normalization=normalization,
    )


def score_offline(
    model: RewardModel,
    inputs: Sequence[Item],
    policy: BatchPolicy = OFFLINE,
    on_batch: Callable[[Batch | SharedBatch | PackedBatch], None] | None = None,
) -> list[float]:
    """Rewards of `inputs`, in order, batched shortest first as the server would batch them; `on_batch` sees each
    planned batch (the benchmark counts its tokens)."""
    policy = policy.for_model(model)
    encoded = model.encoder.encode_batch(list(inputs))
    queue: TokenBudgetQueue[Queued] = TokenBudgetQueue(policy)
    queue.extend(Queued(encoded[i], i) for i in sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
    rewards = [0.0] * len(encoded)
    while batch := queue.next_batch():
        planned = model.plan([q.encoded for q in batch], *policy.layout)
        if on_batch is not None:
            on_batch(planned)
        for q, reward in zip(batch, model.run(planned), strict=True):
            rewards[q.index] = reward
    return rewards
