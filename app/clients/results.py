"""What the clients return: typed results, joined in order from the answers to one call's chunks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.clients.errors import RewardServerError

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ItemScore:
    """One scored sequence; `truncated` says the start of the prompt (or reply) was cut to fit the model."""

    reward: float
    num_tokens: int
    truncated: bool
    members: dict[str, float] | None = None  # an ensemble's: each member's reward (`reward` is their aggregate)
    std: float | None = None  # an ensemble's: its members' spread
    step_rewards: list[float] | None = None  # a process reward model's: each step's (`reward` is their aggregate)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ItemScore:
        members, steps = data.get("members"), data.get("step_rewards")
        return cls(
            reward=float(data["reward"]),
            num_tokens=int(data["num_tokens"]),
            truncated=bool(data["truncated"]),
            members=None if members is None else {str(k): float(v) for k, v in members.items()},
            std=None if data.get("std") is None else float(data["std"]),
            step_rewards=None if steps is None else [float(x) for x in steps],
        )


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """`/score`: `rewards[i]` and `items[i]` belong to the i-th item sent."""

    rewards: list[float]
    items: list[ItemScore]
    fingerprint: str
    model: str | None = None  # the model (or ensemble) that scored them; None from a server before registries
    warnings: list[str] = field(default_factory=list)  # the server's reward-hacking monitor's, for this run


@dataclass(frozen=True, slots=True)
class PairScore:
    """One pair: Bradley-Terry P(a preferred to b) and both sides' scores."""

    probability: float
    a: ItemScore
    b: ItemScore


@dataclass(frozen=True, slots=True)
class CompareResult:
    """`/compare`: per-pair probabilities, with each side's rewards as flat lists for convenience."""

    probabilities: list[float]
    rewards_a: list[float]
    rewards_b: list[float]
    pairs: list[PairScore]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class GroupRank:
    """`/rank` for one prompt's responses: rewards and the group statistics GRPO/RLOO-style trainers use."""

    rewards: list[float]
    mean: float
    std: float
    advantages: list[float]
    loo_baselines: list[float | None]  # None for a group of one: no other response to average
    ranks: list[int]
    probabilities: list[list[float]] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupRank:
        matrix = data.get("probabilities")
        return cls(
            rewards=[float(x) for x in data["rewards"]],
            mean=float(data["mean"]),
            std=float(data["std"]),
            advantages=[float(x) for x in data["advantages"]],
            loo_baselines=[None if x is None else float(x) for x in data["loo_baselines"]],
            ranks=[int(x) for x in data["ranks"]],
            probabilities=None if matrix is None else [[float(p) for p in row] for row in matrix],
        )


@dataclass(frozen=True, slots=True)
class RankResult:
    """`/rank`: `groups[i]` belongs to the i-th group sent."""

    groups: list[GroupRank]
    fingerprint: str


def one_fingerprint(bodies: Sequence[Body]) -> str:
    fingerprints = {b["fingerprint"] for b in bodies}
    if len(fingerprints) != 1:
        raise RewardServerError(
            None,
            "fingerprint_mismatch",
            f"chunks of one call were scored by different models ({sorted(fingerprints)}); "
            "the server changed checkpoint mid-call or a load balancer mixes models",
        )
    return fingerprints.pop()


def score_result(bodies: Sequence[Body]) -> ScoreResult:
    fingerprint = one_fingerprint(bodies)
    items = [ItemScore.from_json(i) for b in bodies for i in b["items"]]
    warnings = list(dict.fromkeys(w for b in bodies for w in b.get("warnings", [])))
    return ScoreResult([i.reward for i in items], items, fingerprint, bodies[0].get("model"), warnings)


def compare_result(bodies: Sequence[Body]) -> CompareResult:
    fingerprint = one_fingerprint(bodies)
    pairs = [
        PairScore(float(p["probability"]), ItemScore.from_json(p["a"]), ItemScore.from_json(p["b"]))
        for b in bodies
        for p in b["pairs"]
    ]
    return CompareResult(
        probabilities=[p.probability for p in pairs],
        rewards_a=[p.a.reward for p in pairs],
        rewards_b=[p.b.reward for p in pairs],
        pairs=pairs,
        fingerprint=fingerprint,
    )


def rank_result(bodies: Sequence[Body]) -> RankResult:
    fingerprint = one_fingerprint(bodies)
    return RankResult(groups=[GroupRank.from_json(g) for b in bodies for g in b["groups"]], fingerprint=fingerprint)
