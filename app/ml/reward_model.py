"""The reward math: backbone -> hidden state of the last real token -> linear head -> one float per sequence."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from app.batching import padded
from app.ml.collate import Batch, collate, last_real_index
from app.ml.recipe import Encoded, RecipeEncoder, ScoringInput

Pooling = Literal["last_token", "classifier"]


class RewardHeadModel(nn.Module):
    """One module for every checkpoint format.

    `last_token`: the backbone's hidden state at the last token with attention mask 1, through `head` (decoder
    reward models, value-head checkpoints). `classifier`: the checkpoint's own sequence-classification forward
    (encoders, whose pooler reads [CLS]). Rewards come back as float32 whatever the compute dtype.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None,
        pooling: Pooling,
        head_index: int = 0,
    ) -> None:
        super().__init__()
        if pooling == "last_token" and head is None:
            raise ValueError("last_token pooling needs a head")
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        self.head_index = head_index
        accepted = inspect.signature(backbone.forward).parameters
        self._takes_positions = "position_ids" in accepted
        self._takes_types = "token_type_ids" in accepted
        self._takes_cache_flag = "use_cache" in accepted

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_positions:
            if position_ids is None:  # left or right padding: count real tokens so far
                position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            kwargs["position_ids"] = position_ids
        if self._takes_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.pooling == "classifier":
            return self.backbone(**kwargs).logits[:, self.head_index].float()
        if self._takes_cache_flag:
            kwargs["use_cache"] = False
        hidden = self.backbone(**kwargs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_real_index(attention_mask)]
        assert self.head is not None
        head_dtype = next(self.head.parameters()).dtype
        return self.head(last.to(head_dtype))[:, self.head_index].float()


@dataclass
class RewardModel:
    """A loaded checkpoint, ready to score encoded items: module + recipe + what `/info` reports."""

    module: RewardHeadModel
    encoder: RecipeEncoder
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return self.encoder.recipe.max_length

    def forward_batch(self, batch: Batch) -> torch.Tensor:
        dev = self.device
        with torch.inference_mode():
            return self.module(
                batch.input_ids.to(dev),
                batch.attention_mask.to(dev),
                batch.position_ids.to(dev),
                None if batch.token_type_ids is None else batch.token_type_ids.to(dev),
            ).cpu()

    def score(self, items: Sequence[Encoded], pad_to_multiple_of: int = 1) -> list[float]:
        """One padded forward pass over `items`; their rewards in order."""
        rewards = self.forward_batch(collate(items, self.pad_id, pad_to_multiple_of)).tolist()
        if len(rewards) != len(items):
            raise RuntimeError(f"model returned {len(rewards)} rewards for {len(items)} items")
        return rewards

    def score_inputs(
        self, inputs: Sequence[ScoringInput], max_batch_tokens: int = 8192, pad_to_multiple_of: int = 16
    ) -> list[float]:
        """Offline scoring (evaluation, benchmarks): length-sorted batches under a padded-token budget."""
        encoded = self.encoder.encode_batch(list(inputs))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        rewards = [0.0] * len(encoded)
        batch: list[int] = []

        def flush() -> None:
            for i, r in zip(batch, self.score([encoded[i] for i in batch], pad_to_multiple_of), strict=True):
                rewards[i] = r
            batch.clear()

        for i in order:  # ascending: the newest item is the batch's longest
            if batch and (len(batch) + 1) * padded(len(encoded[i]), pad_to_multiple_of) > max_batch_tokens:
                flush()
            batch.append(i)
        if batch:
            flush()
        return rewards
