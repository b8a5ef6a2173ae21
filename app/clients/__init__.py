"""Clients of the reward server: httpx and the standard library only (no torch, no fastapi, no transformers)."""

from app.clients.client import AsyncRewardClient, RewardClient
from app.clients.errors import RewardServerError
from app.clients.results import CompareResult, GroupRank, ItemScore, PairScore, RankResult, ScoreResult
from app.clients.trl import AsyncRewardFunction, RewardFunction

__all__ = [
    "AsyncRewardClient",
    "AsyncRewardFunction",
    "CompareResult",
    "GroupRank",
    "ItemScore",
    "PairScore",
    "RankResult",
    "RewardClient",
    "RewardFunction",
    "RewardServerError",
    "ScoreResult",
]
