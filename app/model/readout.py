"""How a row of a head's outputs becomes one reward: a single output, or a weighted sum of named attributes.

A reward head has one output. A multi-attribute head (Nemotron-4-340B-Reward's five HelpSteer2 attributes, ArmoRM's
objectives) has several, named by `config.id2label` or the manifest's `attributes`; the reward its card recommends
is a weighted sum of them. The weights come from `REWARD_ATTRIBUTE_WEIGHTS` (or a models file's `attribute_weights`),
else from the checkpoint's manifest; `REWARD_HEAD_INDEX` picks one output instead. Decided once, at load.
A process reward model's row holds its head's outputs at each step (`app.model.steps`): each step's probability of
being right, and the reward their aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.model.checkpoint import CheckpointError
from app.model.reward_model import sigmoid
from app.model.steps import StepAggregate, StepRule, aggregate


@dataclass(frozen=True, slots=True)
class Readout:
    """`labels`: the head's outputs, by name. The reward is output `index`, or the sum of `weights` x outputs."""

    labels: tuple[str, ...]
    index: int | None = 0
    weights: tuple[float, ...] | None = None
    distance: int | None = None  # the column after the head's where the monitor's probe puts its distance
    steps: StepRule | None = None  # a process reward model's: its row is the head's outputs at each step

    def reward(self, outputs: Sequence[float], how: StepAggregate | None = None) -> float:
        """`how`: a process reward model's aggregate of its steps (None: the model's default)."""
        if self.steps is not None:
            return aggregate(self.step_rewards(outputs), how or self.steps.aggregate)
        if self.weights is None:
            assert self.index is not None
            return outputs[self.index]
        return math.fsum(w * o for w, o in zip(self.weights, outputs[: len(self.labels)], strict=True) if w)

    def step_rewards(self, outputs: Sequence[float]) -> list[float]:
        """Each step's probability of being right (a process reward model's row)."""
        assert self.steps is not None
        return [sigmoid(x) for x in self.steps.log_odds(outputs, len(self.labels))]

    def attributes(self, outputs: Sequence[float]) -> dict[str, float] | None:
        """Every named output, for a head with several (None for a plain reward head or a process reward model)."""
        if len(self.labels) < 2 or self.steps is not None:
            return None
        return dict(zip(self.labels, outputs[: len(self.labels)], strict=True))

    def state_distance(self, outputs: Sequence[float]) -> float | None:
        """The item's distance from the checkpoint's reference states (`app.model.reference`), when it has one."""
        return outputs[self.distance] if self.distance is not None else None

    def column(self, index: int) -> Readout:
        """Output `index` alone: one member's reward in a shared-base model's row."""
        return Readout((self.labels[index],), index)

    def fingerprint_part(self) -> dict[str, object]:
        """What the fingerprint holds: the index (as it always has), and the weights when a sum is the reward; a
        process reward model's step rule."""
        if self.steps is not None:
            return {"head_index": None, "steps": self.steps.model_dump()}
        if self.weights is None:
            return {"head_index": self.index}
        return {"head_index": None, "attribute_weights": dict(zip(self.labels, self.weights, strict=True))}


def readout_for(
    num_outputs: int,
    labels: Mapping[int, str] | Sequence[str] | None,
    head_index: int | None,
    weights: Mapping[str, float] | None,
    where: object,
) -> Readout:
    """The readout of a head with `num_outputs` outputs, or a CheckpointError naming `where` and what to set."""
    if isinstance(labels, Mapping):
        labels = [str(labels.get(i, labels.get(str(i), f"LABEL_{i}"))) for i in range(num_outputs)]  # type: ignore[call-overload]
    names = tuple(labels) if labels else tuple(f"LABEL_{i}" for i in range(num_outputs))
    if len(names) != num_outputs or len(set(names)) != num_outputs:
        raise CheckpointError(f"{where}: {num_outputs} outputs but labels {list(names)}")
    if head_index is not None and weights is not None:
        raise CheckpointError(f"{where}: set attribute weights or a head index, not both")
    if weights is not None:
        if unknown := sorted(set(weights) - set(names)):
            raise CheckpointError(f"{where}: attribute weights name {unknown}; the head's outputs are {list(names)}")
        if not all(math.isfinite(w) for w in weights.values()) or not any(weights.values()):
            raise CheckpointError(f"{where}: attribute weights must be finite and not all 0 ({dict(weights)})")
        return Readout(names, None, tuple(float(weights.get(n, 0.0)) for n in names))
    if head_index is None and num_outputs != 1:
        raise CheckpointError(
            f"{where}: the head has {num_outputs} outputs {list(names)}; a reward model has 1. Set "
            "REWARD_ATTRIBUTE_WEIGHTS (JSON, label -> weight) for their weighted sum, or REWARD_HEAD_INDEX for one"
        )
    index = head_index or 0
    if index >= num_outputs:
        raise CheckpointError(f"{where}: head_index {index} out of range for {num_outputs} outputs")
    return Readout(names, index)


def step_readout(rule: StepRule, num_outputs: int, where: object) -> Readout:
    """A process reward model's readout: a sigmoid reads one output, a softmax two."""
    wanted = 1 if rule.read == "sigmoid" else 2
    if num_outputs != wanted:
        raise CheckpointError(
            f"{where}: the step rule reads a {rule.read} of {wanted} outputs; the head has {num_outputs}"
        )
    return Readout(tuple(f"LABEL_{i}" for i in range(num_outputs)), None, steps=rule)
