"""What a request's items come back as: each item's score (plain, with attributes, an ensemble's, a process reward
model's steps), and `Scores`, what every response builder reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from dataclasses import field as attribute
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, SerializeAsAny

from app.model.checkpoint import Normalization
from app.model.steps import StepAggregate, aggregate

if TYPE_CHECKING:
    from app.engine.results import ItemResult
    from app.model.readout import Readout


class ItemScore(BaseModel):
    reward: float
    num_tokens: int = Field(description="tokens the model read, after truncation")
    truncated: bool = Field(description="true when the start of the prompt (or reply) was cut to fit max_length")


class AttributedItemScore(ItemScore):
    """A multi-attribute head's item: `reward` is the weighted sum of `attributes` (or the one REWARD_HEAD_INDEX
    picks); normalization, when on, applies to `reward` only."""

    attributes: dict[str, float] = Field(description="every output of the head, by its label")


class EnsembleItemScore(ItemScore):
    """An ensemble's item: `reward` is the aggregate of `members`' rewards."""

    members: dict[str, float] = Field(description="each member's reward, as it gives it served alone")
    std: float = Field(description="the members' standard deviation (over them all: ddof 0)")


class StepItemScore(ItemScore):
    """A process reward model's item: `reward` is the `aggregate` of `step_rewards` (`app.model.steps`)."""

    step_rewards: list[float] = Field(description="each step's probability of being right, in order")
    aggregate: StepAggregate = Field(description="how `reward` was made from them: the request's, else the model's")


Items = list[SerializeAsAny[ItemScore]]  # an ensemble's items keep their members and std, attributes theirs


@dataclass(frozen=True, slots=True)
class Scores:
    """A request's results with the normalization in force applied, once (`of`): what every response builder reads,
    with the model that scored them. `raw`: the model's rewards, for what must not be normalized (Bradley-Terry
    probabilities)."""

    items: list[ItemScore]
    raw: list[float]
    normalization: Normalization | None
    model: str
    fingerprint: str
    warnings: list[str] = attribute(default_factory=list)  # the monitor's, for the request's run
    distances: list[float | None] | None = None  # from the checkpoint's reference states (`app.model.reference`)

    @classmethod
    def of(
        cls,
        results: Sequence[ItemResult],
        readout: Readout,
        normalization: Normalization | None,
        model: str,
        fingerprint: str,
    ) -> Scores:
        """The model's outputs read as rewards (`readout`), normalized as in force."""
        norm = normalization.apply if normalization else float
        raw = [readout.reward(r.outputs) for r in results]
        items: list[ItemScore] = []
        for r, reward in zip(results, raw, strict=True):
            attributes = readout.attributes(r.outputs)
            fields = {"reward": norm(reward), "num_tokens": r.num_tokens, "truncated": r.truncated}
            if readout.steps is not None:
                steps = readout.step_rewards(r.outputs)
                items.append(StepItemScore(**fields, step_rewards=steps, aggregate=readout.steps.aggregate))
                continue
            item = ItemScore(**fields) if attributes is None else AttributedItemScore(**fields, attributes=attributes)
            items.append(item)
        distances = [readout.state_distance(r.outputs) for r in results] if readout.distance is not None else None
        return cls(items, raw, normalization, model, fingerprint, distances=distances)

    def aggregated(self, how: StepAggregate | None) -> Scores:
        """A process reward model's items with `reward` the aggregate `how` of their steps (None: as they are)."""
        if how is None:
            return self
        items, raw = [], []
        for item, old in zip(self.items, self.raw, strict=True):
            if not isinstance(item, StepItemScore):
                items.append(item)
                raw.append(old)
                continue
            raw.append(aggregate(item.step_rewards, how))
            norm = self.normalization.apply(raw[-1]) if self.normalization else raw[-1]
            items.append(item.model_copy(update={"reward": norm, "aggregate": how}))
        return replace(self, items=items, raw=raw)

    @property
    def rewards(self) -> list[float]:
        return [i.reward for i in self.items]

    def raw_items(self) -> list[ItemScore]:
        return [i.model_copy(update={"reward": r}) for i, r in zip(self.items, self.raw, strict=True)]

    def chunk(self, start: int, stop: int) -> Scores:
        distances = self.distances[start:stop] if self.distances is not None else None
        return replace(self, items=self.items[start:stop], raw=self.raw[start:stop], distances=distances)
