"""How an ensemble turns its members' rewards for one item into one reward, and how far apart they are.

The aggregates are those of the reward-model-ensemble literature: `mean`; `min`, the worst case (Coste et al. 2023,
arXiv 2310.02743); `uwo`, uncertainty-weighted optimisation, mean - lambda x variance (ibid.); and `softmin`,
-beta log mean exp(-r / beta), which runs from the mean (beta -> inf) to the minimum (beta -> 0). The spread is the
population standard deviation over members (the variance `uwo` penalises, square-rooted)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AggregateName = Literal["mean", "min", "uwo", "softmin"]


class Aggregate(BaseModel):
    """An ensemble's aggregate and its parameter, as the models file gives them (`lambda` for uwo, `beta` for
    softmin)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    how: AggregateName = Field("mean", alias="aggregate")
    lambda_: float = Field(1.0, ge=0, alias="lambda", description="uwo: weight of the members' variance")
    beta: float = Field(1.0, gt=0, description="softmin: temperature; small is close to min, large to the mean")

    def __call__(self, rewards: Sequence[float]) -> float:
        mean = math.fsum(rewards) / len(rewards)
        if self.how == "mean":
            return mean
        if self.how == "min":
            return min(rewards)
        if self.how == "uwo":
            return mean - self.lambda_ * variance(rewards)
        low = min(rewards)  # -beta log mean exp(-r/beta), shifted by the minimum so no exp overflows
        return low - self.beta * math.log(math.fsum(math.exp(-(r - low) / self.beta) for r in rewards) / len(rewards))

    def describe(self) -> str:
        extra = {"uwo": f", lambda={self.lambda_:g}", "softmin": f", beta={self.beta:g}"}.get(self.how, "")
        return f"{self.how}{extra}"


def variance(rewards: Sequence[float]) -> float:
    """Over the members as a population (ddof 0): an ensemble is all its members, not a sample of them."""
    mean = math.fsum(rewards) / len(rewards)
    return math.fsum((r - mean) ** 2 for r in rewards) / len(rewards)


def std(rewards: Sequence[float]) -> float:
    return math.sqrt(variance(rewards))
