"""The reward math: backbone -> hidden state of the last real token -> linear head -> one float per sequence."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from torch import nn

from app.model import invariant
from app.model.collate import Batch, SharedBatch, collate, collate_shared, last_real_index
from app.model.packed import PackedBatch, pack
from app.model.recipe import Encoded, RecipeEncoder

log = logging.getLogger(__name__)

Pooling = Literal["last_token", "classifier"]
INVARIANT_PROBE_ROWS = 64


def sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|; sigmoid(r_a - r_b) is the Bradley-Terry P(a > b)."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


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
        self._takes_cache = cache_argument(backbone) is not None
        config = getattr(backbone, "config", None)
        self.attention: str | None = getattr(config, "_attn_implementation", None)  # the stock kernel
        # decoders read at the last token can run batch-invariantly (`forward_packed`); stock kernels until asked
        self.may_be_invariant = pooling == "last_token" and self._takes_positions and invariant.install(backbone)
        if self.may_be_invariant and head is not None:
            invariant.block_linears(head)

    @property
    def may_share_prefixes(self) -> bool:
        """Whether `forward_shared` can run at all; `RewardModel` checks it also gives `forward`'s numbers."""
        return self.pooling == "last_token" and self._takes_cache and self._takes_positions

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
        return self._read(self.backbone(**kwargs).last_hidden_state, last_real_index(attention_mask))

    def forward_shared(self, batch: SharedBatch) -> torch.Tensor:
        """`forward` for a `SharedBatch`: each prefix runs once and its keys/values serve all of its items."""
        return self._read(shared_hidden(self.backbone, batch)[1], batch.last_index)

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """`forward` for a `PackedBatch`, batch-invariantly (`invariant`): each item's reward a function of it alone."""
        if not self.may_be_invariant:
            raise ValueError("this model cannot run batch-invariantly: its batch policy must not ask it to")
        with invariant.running(self.backbone, batch.block_rows):
            hidden = self.backbone(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, reward_spans=batch.spans
            ).last_hidden_state
            return self._read(hidden.expand(len(batch), -1, -1), batch.last_index)  # one packed row, read per item

    def _read(self, hidden: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index.to(hidden.device)]
        assert self.head is not None
        weight = next(self.head.parameters())  # float32, on the device the backbone's output may not share
        return self.head(last.to(device=weight.device, dtype=weight.dtype))[:, self.head_index].float()


def cache_argument(backbone: nn.Module) -> str | None:
    """The keyword a backbone takes its key/value cache by (transformers 5 renamed `past_key_values` to `cache`)."""
    accepted = inspect.signature(backbone.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in accepted), None)


def shared_hidden(backbone: nn.Module, batch: SharedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of a `SharedBatch` through a causal backbone: ([prefixes, Lp, H], [items, Ls, H])."""
    p = batch.prefixes
    out = backbone(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # transformers 5 renamed it
    cache.reorder_cache(batch.group)  # one copy of its prefix's keys/values per item
    suffix = backbone(
        input_ids=batch.suffix_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **{cache_argument(backbone) or "past_key_values": cache},
    ).last_hidden_state
    return out.last_hidden_state, suffix


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

    @property
    def device_type(self) -> str:
        return self.device.type

    def plan(
        self,
        items: Sequence[Encoded],
        pad_to_multiple_of: int = 1,
        share: bool = False,
        block_rows: int | None = None,
    ) -> Batch | SharedBatch | PackedBatch:
        """The layout `run` computes; with `share` (which the batch policy decides, from the setting and
        `can_share_prefixes`), prompts that items share run once. With `block_rows` (the policy decides it too, from
        the setting and `can_be_invariant`) the items are packed and each one's reward is a function of it alone."""
        if share and not self.can_share_prefixes:
            raise ValueError("this model cannot share prompts: its batch policy must not ask it to")
        if block_rows is not None:
            return pack(items, block_rows, share)
        shared = collate_shared(items, self.pad_id, pad_to_multiple_of) if share else None
        return shared if shared is not None else collate(items, self.pad_id, pad_to_multiple_of)

    def run(self, batch: Batch | SharedBatch | PackedBatch) -> list[float]:
        """One forward pass; the rewards of the batch's items, in order."""
        on = batch.to(self.device)
        with torch.inference_mode():
            if isinstance(on, PackedBatch):
                rewards = self.module.forward_packed(on)
            elif isinstance(on, SharedBatch):
                rewards = self.module.forward_shared(on)
            else:
                rewards = self.module(on.input_ids, on.attention_mask, on.position_ids, on.token_type_ids)
        if rewards.shape[0] != len(batch):
            raise RuntimeError(f"model returned {rewards.shape[0]} rewards for {len(batch)} items")
        return rewards.cpu().tolist()

    def score(
        self,
        items: Sequence[Encoded],
        pad_to_multiple_of: int = 1,
        share: bool = False,
        block_rows: int | None = None,
    ) -> list[float]:
        return self.run(self.plan(items, pad_to_multiple_of, share, block_rows))

    @cached_property
    def can_be_invariant(self) -> bool:
        """Checked once, on numbers: the per-item attention was reached (a backbone that does not pass its keyword
        arguments down to attention keeps the stock kernel) and items alone equal the same items batched."""
        if not self.module.may_be_invariant:
            return False
        texts = ["Which planet is the largest?", "Jupiter.", "Saturn, by far, if you count its rings as well."]
        probe = [Encoded(ids, None, False) for ids in self.encoder.tokenizer(texts, add_special_tokens=False).input_ids]
        calls = invariant.per_item_calls()
        try:
            alone = [self.score([item], block_rows=INVARIANT_PROBE_ROWS)[0] for item in probe]
            together = self.score(probe, block_rows=INVARIANT_PROBE_ROWS)
        except Exception:
            log.warning("batch invariance unavailable: the per-item kernels failed", exc_info=True)
            return False
        if invariant.per_item_calls() == calls:
            log.warning("batch invariance unavailable: this backbone does not pass its arguments to attention")
            return False
        if alone != together:
            log.warning("batch invariance unavailable: batched %s vs alone %s", together, alone)
            return False
        return True

    @cached_property
    def can_share_prefixes(self) -> bool:
        """Checked once, on numbers: a backbone whose cached path differs from its plain forward (attention that is
        not causal, a cache it does not honour) never shares prompts."""
        if not self.module.may_share_prefixes:
            return False
        # Token ids straight from the tokenizer, not through the recipe: the question is what the backbone computes,
        # and a recipe's truncation (a short max_length) could cut the shared prompt out of the probe.
        ids = self.encoder.tokenizer(
            ["Which planet is the largest?", " Jupiter.", " Saturn, by far."], add_special_tokens=False
        ).input_ids
        probe = [Encoded(ids[0] + reply, None, False, prefix=len(ids[0])) for reply in ids[1:]]
        shared = collate_shared(probe, self.pad_id)
        assert shared is not None  # both items begin with the same prompt
        try:
            reference, reused = self.run(collate(probe, self.pad_id)), self.run(shared)
        except Exception:  # a cache API this code does not know: serve the plain way
            log.warning("prompt sharing disabled: the cached forward failed", exc_info=True)
            return False
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        if any(abs(a - b) > tolerance * max(1.0, abs(a)) for a, b in zip(reference, reused, strict=True)):
            log.warning("prompt sharing disabled: it changes this model's rewards (%s vs %s)", reused, reference)
            return False
        return True
