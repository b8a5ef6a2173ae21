"""A checkpoint's reference for the reward-hacking monitor: how its own eval set reads, stored beside it by
`reward-server eval` (`<checkpoint>/eval/monitor_reference.json`, a directory no fingerprint reads).

It holds the eval set's reward distribution and corr(reward, length), and a low-rank Gaussian fit of the hidden state
the head reads (the last real token's): mean, the top principal directions and their scales, and the variance left
outside them (probabilistic PCA). An item's distance is its squared Mahalanobis distance under that fit (in the
subspace, plus its squared distance from the subspace over the variance left) over the eval set's 99th percentile
of it, so about 1% of items like the eval set's are past 1. The part outside the subspace is what tells text of
another domain: on models/default, hexadecimal dumps lie inside the eval set's 99th percentile by the subspace alone
and all past it with the rest counted. The probe that computes it rides along the forward pass as one extra output
column after the head's (the readout never reads it), so it costs two small matmuls per batch and no second pass."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from app.model.recipe import Encoded
from app.model.reward_model import RewardHeadModel, RewardModel

REFERENCE = Path("eval") / "monitor_reference.json"
COMPONENTS = 16
QUANTILE = 0.99


class Reference(BaseModel):
    """What the monitor draws beside a run's signals, and the state fit its out-of-distribution share uses."""

    items: int
    reward_mean: float
    reward_std: float
    reward_quantiles: list[float] = Field(description="p10, p50, p90")
    length_corr: float | None
    state_mean: list[float]
    state_basis: list[list[float]] = Field(description="[hidden, k]: the principal directions")
    state_scale: list[float] = Field(description="each direction's standard deviation")
    residual_variance: float | None = Field(
        None, description="per dimension outside the subspace; None (a reference written before it): the subspace only"
    )
    threshold: float = Field(description="the eval items' 99th percentile of the squared distance")

    @classmethod
    def read(cls, checkpoint: Path) -> Reference | None:
        file = checkpoint / REFERENCE
        return cls.model_validate_json(file.read_text()) if file.exists() else None

    def summary(self) -> dict[str, Any]:
        """The part the monitor shows (no state fit)."""
        return self.model_dump(exclude={"state_mean", "state_basis", "state_scale", "residual_variance", "threshold"})


class StateProbe(nn.Module):
    """[items, hidden] last-token states -> [items, 1]: squared distance under the fit over the threshold."""

    def __init__(self, reference: Reference) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(reference.state_mean, dtype=torch.float32))
        self.register_buffer("basis", torch.tensor(reference.state_basis, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(reference.state_scale, dtype=torch.float32).clamp(min=1e-6))
        self.residual_variance, self.threshold = reference.residual_variance, reference.threshold

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        states = states.to(self.mean.device, torch.float32)
        return distance(states, self.mean, self.basis, self.scale, self.residual_variance) / self.threshold


def distance(
    states: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, residual: float | None
) -> torch.Tensor:
    """[items, 1]: the squared Mahalanobis distance under the fit (`residual` None: in the subspace only)."""
    centred = states - mean
    projected = centred @ basis
    squared = (projected / scale).pow(2).sum(dim=1, keepdim=True)
    if residual is None:
        return squared
    outside = (centred - projected @ basis.T).pow(2).sum(dim=1, keepdim=True)
    return squared + outside / residual


def fit(states: torch.Tensor, rewards: list[float], lengths: list[int]) -> Reference:
    """The reference of an eval set: `states` [items, hidden] the head read, their rewards and reply lengths."""
    import statistics

    x = states.double()
    mean = x.mean(dim=0)
    k = max(1, min(COMPONENTS, x.shape[0] // 10, x.shape[1] - 1))  # 10 items a direction: a fit, not the items
    _, singular, v = torch.linalg.svd(x - mean, full_matrices=False)
    basis = v[:k].T
    scale = (singular[:k] / math.sqrt(max(1, x.shape[0] - 1))).clamp(min=1e-6)
    left = x.shape[1] - k  # dimensions outside the subspace, and the eval states' variance per dimension there
    residual = float(singular[k:].pow(2).sum()) / max(1, x.shape[0] - 1) / left if left else None
    distances = distance(x, mean, basis, scale, residual or None).squeeze(1)
    quantiles = statistics.quantiles(rewards, n=10, method="inclusive")
    corr = statistics.correlation(rewards, [float(n) for n in lengths]) if len(set(lengths)) > 1 else None
    return Reference(
        items=len(rewards),
        reward_mean=statistics.fmean(rewards),
        reward_std=statistics.pstdev(rewards),
        reward_quantiles=[quantiles[0], quantiles[4], quantiles[8]],
        length_corr=corr,
        state_mean=mean.tolist(),
        state_basis=basis.tolist(),
        state_scale=scale.tolist(),
        residual_variance=residual or None,
        threshold=float(torch.quantile(distances, QUANTILE)) or 1.0,
    )


def write(reference: Reference, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REFERENCE.name
    path.write_text(json.dumps(reference.model_dump()) + "\n")
    return path


class _Capture(nn.Module):
    """Stands in for the probe while a reference is fitted: keeps the states, adds a zero column."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        self.seen.append(states.detach().float().cpu())
        return states.new_zeros(len(states), 1)


def states_of(model: RewardModel, items: Sequence[Encoded], batch: int = 16) -> torch.Tensor:
    """The last-token states the head reads for `items` ([items, hidden]), by padded forwards."""
    module = model.module
    if not isinstance(module, RewardHeadModel) or module.pooling != "last_token":
        raise ValueError("only a head read at the last token has the states a reference fits")
    capture, kept = _Capture(), module.probe
    module.probe = capture
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))  # like lengths together: little padding
    try:
        for start in range(0, len(order), batch):
            model.stock([items[i] for i in order[start : start + batch]])
    finally:
        module.probe = kept
    states = torch.empty(len(items), capture.seen[0].shape[1]) if capture.seen else torch.empty(0, 0)
    states[order] = torch.cat(capture.seen)
    return states
