"""The reward math: backbone -> hidden state of the last real token -> linear head -> its outputs per sequence ->
the reward (`Readout`); and the one way a plan (`app.model.plan`) is run."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from app.model import invariant
from app.model.collate import collate, last_real_index, positions_of
from app.model.info import Kernels, ModelInfo
from app.model.plan import Plan, Tokens, plan_of
from app.model.recipe import Encoded, RecipeEncoder

if TYPE_CHECKING:
    from app.model.family import SharedBaseModel
    from app.model.readout import Readout

log = logging.getLogger(__name__)

Pooling = Literal["last_token", "classifier"]
PROBE = ["Which planet is the largest?", "Jupiter.", "Saturn, by far, if you count its rings as well."]


def sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x|; sigmoid(r_a - r_b) is the Bradley-Terry P(a > b)."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


class RewardHeadModel(nn.Module):
    """One module for every checkpoint format.

    `last_token`: the backbone's hidden state at the last token with attention mask 1, through `head` (decoder
    reward models, value-head checkpoints). `classifier`: the checkpoint's own sequence-classification forward
    (encoders, whose pooler reads [CLS]). Every output of the head comes back ([items, outputs]), as float32
    whatever the compute dtype; the model's `Readout` makes them a reward.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None, pooling: Pooling) -> None:
        super().__init__()
        if pooling == "last_token" and head is None:
            raise ValueError("last_token pooling needs a head")
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        self.probe: nn.Module | None = None  # the monitor's state probe (`app.model.reference`): one more column
        accepted = inspect.signature(backbone.forward).parameters
        self._takes_positions = "position_ids" in accepted
        self._takes_types = "token_type_ids" in accepted
        self._takes_cache_flag = "use_cache" in accepted
        config = getattr(backbone, "config", None)
        self.attention: str | None = getattr(config, "_attn_implementation", None)  # the stock kernel
        # decoders read at the last token pack their items (`forward_packed`): the kernels are installed once, here
        self.may_pack = pooling == "last_token" and self._takes_positions and invariant.install(backbone, head)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        reads: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """A padded batch (left or right), the stock way: training, and models that cannot pack. `reads`: (rows,
        positions) to read the head at (a process reward model's steps); None: each row's last real token."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_positions:
            kwargs["position_ids"] = positions_of(attention_mask) if position_ids is None else position_ids
        if self._takes_types and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.pooling == "classifier":
            return self.backbone(**kwargs).logits.float()
        if self._takes_cache_flag:
            kwargs["use_cache"] = False
        assert self.head is not None
        hidden = self.backbone(**kwargs).last_hidden_state
        if reads is not None:
            return read_last(hidden, reads[1], self.head, self.probe, rows=reads[0])
        return read_last(hidden, last_real_index(attention_mask), self.head, self.probe)

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, spans: invariant.Spans, last: torch.Tensor
    ) -> torch.Tensor:
        """One packed row ([1, T]); `last`: the tokens the head reads in it (each item's last, or its steps')."""
        hidden = self.backbone(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, reward_spans=spans
        ).last_hidden_state
        assert self.head is not None
        return read_last(hidden.expand(len(last), -1, -1), last, self.head, self.probe)


def read_last(
    hidden: torch.Tensor,
    last_index: torch.Tensor,
    head: nn.Module,
    probe: nn.Module | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The head's outputs at each row's `last_index` token (`rows`: at row `rows[i]`'s `last_index[i]`), in float32
    (the head's dtype); with a `probe`, its value of the same state as one more column."""
    rows = torch.arange(hidden.shape[0]) if rows is None else rows
    last = hidden[rows.to(hidden.device), last_index.to(hidden.device)]
    weight = next(head.parameters())  # float32, on the device the backbone's output may not share
    outputs = head(last.to(device=weight.device, dtype=weight.dtype)).float()
    return outputs if probe is None else torch.cat([outputs, probe(last).to(outputs.device)], dim=1)


@dataclass
class RewardModel:
    """A loaded checkpoint, ready to score encoded items: module + recipe + readout + what `/info` reports.
    `prepare` (once, on the thread that will run it) decides how plans run; until then, and for `score`, it is
    prepared by default. `members`: a shared-base model's (`app.model.family`), one output each."""

    module: RewardHeadModel | SharedBaseModel
    encoder: RecipeEncoder
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    info: ModelInfo
    readout: Readout
    kernels: Kernels | None = None
    members: tuple[ModelInfo, ...] = ()

    @property
    def max_length(self) -> int:
        return self.encoder.recipe.max_length

    @property
    def packs(self) -> bool:
        """The layout every plan for this model takes."""
        return self.prepared.layout == "packed"

    @property
    def prepared(self) -> Kernels:
        return self.kernels or self.prepare()

    def prepare(self, batch_invariant: bool = True, fixed_rows: int = 0, measured: Path | None = None) -> Kernels:
        """Measured here, with this thread's CPU threads: whether the backbone packs (its attention reads the spans),
        and per linear shape the calls that keep its rows batch-invariant (`invariant.choose`; `fixed_rows`: fixed
        blocks of that size instead; `measured`: where those measurements are kept across starts). Returns the
        evidence, also kept as `kernels`."""
        threads = torch.get_num_threads() if self.device.type == "cpu" else None
        self.kernels = Kernels(layout="padded", batch_invariant=False, linears={}, attention_calls=0, threads=threads)
        if not self.module.may_pack:
            return self._padded("not an SDPA decoder read at its last token")
        # a prompt two replies share (read from the row's front) and an item that runs whole
        prompt, *replies = self.encoder.tokenizer(PROBE, add_special_tokens=False).input_ids
        probe = [Encoded(prompt + reply, None, False, prefix=len(prompt)) for reply in replies]
        probe.append(Encoded(replies[-1], None, False))
        invariant.unblock(self.module)
        try:
            spans = self._run_packed(plan_of(probe, packed=True))[1]
        except Exception:  # a backbone this code cannot pack: serve it padded
            log.warning("packing unavailable: the per-item attention failed", exc_info=True)
            return self._padded("the per-item attention failed")
        if not spans.reached:
            return self._padded("this backbone does not pass its arguments down to attention")
        packed = self.kernels.model_copy(update={"layout": "packed", "attention_calls": spans.reached})
        self.kernels = packed
        if not batch_invariant:
            return packed
        memo = invariant.Measurements(measured, self.device)
        linears, moving = invariant.choose(self.module, self.device.type, fixed_rows, memo)
        if moving:
            invariant.unblock(self.module)
            note = f"rows of {', '.join(moving)} move with their place in a call on this device: stock kernels"
            log.warning("batch invariance unavailable: %s", note)
            self.kernels = packed.model_copy(update={"note": note})
            return self.kernels
        # and a long item, so that alone and together its rows run in calls of other sizes than the short ones'
        unit = prompt + replies[-1]
        probe.append(Encoded(unit * max(1, min(invariant.SWEEP_ROWS // 2, self.max_length) // len(unit)), None, False))
        heads = slice(self.readout.distance)  # the head's columns; the monitor's distance need not be invariant
        alone = [self.run(plan_of([item], packed=True))[0][heads] for item in probe]
        together = [row[heads] for row in self.run(plan_of(probe, packed=True))]
        if alone != together:
            invariant.unblock(self.module)
            log.warning("batch invariance unavailable: batched %s vs alone %s", together, alone)
            self.kernels = packed.model_copy(update={"note": f"batched {together} != alone {alone}: stock kernels"})
            return self.kernels
        self.kernels = packed.model_copy(update={"batch_invariant": True, "linears": linears})
        return self.kernels

    def _padded(self, note: str) -> Kernels:
        assert self.kernels is not None
        self.kernels = self.kernels.model_copy(update={"note": f"{note}: padded, stock kernels"})
        return self.kernels

    def run(self, plan: Plan) -> list[list[float]]:
        """One forward pass of `plan`; its items' outputs (`readout` makes each a reward), in order."""
        if plan.packed != self.packs:
            raise ValueError(f"a {'packed' if plan.packed else 'padded'} plan for a {self.prepared.layout} model")
        return _per_item(self._run_packed(plan)[0] if plan.packed else self._padded_forward(plan.items), plan.items)

    def _run_packed(self, plan: Plan) -> tuple[torch.Tensor, invariant.Spans]:
        ids, positions, spans = plan.layout()
        last = []
        for item, (prompt_at, cached, at, _) in zip(plan.items, spans[-len(plan) :], strict=True):
            reads = item.reads or (len(item.input_ids) - 1,)  # item positions: in its prompt's span, or its own
            last += [at + r - cached if r >= cached else prompt_at + r for r in reads]
        as_row = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)[None]  # noqa: E731
        carried = invariant.Spans(spans)
        with torch.inference_mode():
            rewards = self.module.forward_packed(as_row(ids), as_row(positions), carried, as_row(last)[0])
        return rewards, carried

    def _padded_forward(self, items: Sequence[Tokens]) -> torch.Tensor:
        batch = collate(items, self.pad_id).to(self.device)
        reads = None
        if any(item.reads for item in items):  # right padding: an item's positions are its row's
            pairs = [(row, r) for row, item in enumerate(items) for r in item.reads or (len(item.input_ids) - 1,)]
            rows, cols = (torch.tensor(x, dtype=torch.long, device=self.device) for x in zip(*pairs, strict=True))
            reads = (rows, cols)
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.token_type_ids)
        with torch.inference_mode():
            return self.module(*args) if reads is None else self.module(*args, reads)

    def score(self, items: Sequence[Tokens]) -> list[float]:
        """Rewards of `items` in one plan (no budget): probes, peers and tests; the server plans with
        `app.engine.batching`."""
        return [self.readout.reward(row) for row in self.run(plan_of(items, self.packs))]

    def stock(self, items: Sequence[Tokens]) -> list[float]:
        """One padded forward of `items`, as a plain server runs it (the benchmark's peers; stock linears until
        `prepare` blocks them)."""
        return [self.readout.reward(row) for row in _per_item(self._padded_forward(items), items)]


def _per_item(outputs: torch.Tensor, items: Sequence[Tokens]) -> list[list[float]]:
    """[reads, outputs] -> each item's row: its reads' outputs one after another (one read: the last token's)."""
    counts = [len(item.reads) or 1 for item in items]
    if outputs.shape[0] != sum(counts):
        raise RuntimeError(f"model returned {outputs.shape[0]} rows for {sum(counts)} reads of {len(items)} items")
    rows, at, out = outputs.cpu().tolist(), 0, []
    for count in counts:
        out.append([x for row in rows[at : at + count] for x in row])
        at += count
    return out
