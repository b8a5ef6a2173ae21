"""The pieces of one optimizer step: the Bradley-Terry loss (and its length prior), the order pairs are batched in,
and weight averaging."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from app.training.data import PreferencePair
from app.training.evaluate import golden_section, neg_log_sigmoid


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley-Terry, -log sigmoid(r_c - r_r - margin), against a target of 1 - `label_smoothing`: the loss is then
    lowest at a finite margin, so pairs already ranked with confidence are not pushed further apart (over-confident
    tails are what a temperature cannot fix). The centring term keeps rewards near 0."""
    diff = chosen - rejected - margin
    bt = -(1 - label_smoothing) * F.logsigmoid(diff) - label_smoothing * F.logsigmoid(-diff)
    return bt.mean() + center_coef * ((chosen + rejected) ** 2).mean()


def length_gap(pair: PreferencePair) -> float:
    """log(characters of the chosen reply / of the rejected one): the length term's input."""
    return math.log((len(pair.chosen) + 1) / (len(pair.rejected) + 1))


def length_weights(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Per dataset, the w of P(chosen) = sigmoid(w x `length_gap`) that fits its pairs best: a judge of length
    alone (its annotators may favour long replies, or short ones). The log-loss is convex in w: golden-section."""

    def loss(w: float, gaps: list[float]) -> float:
        return sum(neg_log_sigmoid(w * g) for g in gaps)

    out = {}
    for name in sorted({p.dataset for p in pairs}):
        gaps = [length_gap(p) for p in pairs if p.dataset == name]
        out[name] = golden_section(lambda w, gaps=gaps: loss(w, gaps), -10.0, 10.0)
    return out


def length_grouped_batches(lengths: Sequence[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within chunks of 50 batches by length, cut into batches, shuffle the batches: little padding,
    still random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch * 50
    out: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lengths.__getitem__)
        out += [part[i : i + batch] for i in range(0, len(part), batch)]
    rng.shuffle(out)
    return out


class WeightAverage:
    """Stochastic weight averaging: the uniform mean of the weights after every optimizer step past `start`. Late
    steps of a constant-rate walk scatter around a minimum; their mean sits nearer its centre, ranks pairs as well or
    better and spreads margins less at random, which is what calibration suffers from."""

    def __init__(self, params: Sequence[nn.Parameter], start: int) -> None:
        self.params, self.start, self.steps, self.count = list(params), start, 0, 0
        self.mean = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        if self.steps > self.start:
            self.count += 1
            for mean, p in zip(self.mean, self.params, strict=True):
                mean.lerp_(p.detach(), 1 / self.count)

    def applied(self) -> AbstractContextManager[None]:
        """The mean in place of the live weights, for evaluating and saving; the live ones until averaging starts."""
        return swapped(self.params, self.mean if self.count else self.params)


@contextmanager
def swapped(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """`values` in place of the live weights for the block's duration (cast to their dtype), then the live ones."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, live, strict=True):
                p.copy_(value)
