"""Members that share a base, served as one model whose common blocks run once per item.

What `reward-server train` writes (top_k or head mode) is a delta of the last blocks and the final norm plus a head,
over a base. K such members of one base served as K models run that base K times; fused here, the blocks below the
first trained one run once and each member's own top blocks and head read their output (`app.model.split`): one row
of K outputs per item, a member's reward its column. The same operations on the same rows: each member's reward is
bitwise the one it gives served alone (tested; checked on a probe at load, else the members are served apart)."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from app.model import invariant
from app.model.checkpoint import Manifest, read_manifest
from app.model.collate import last_real_index, positions_of
from app.model.fingerprint import model_fingerprint
from app.model.heads import hidden_size, load_head
from app.model.info import ModelInfo
from app.model.loading import load_reward_model, resolve_base
from app.model.readout import Readout
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel, read_last
from app.model.split import DecoderSplit, can_split, shell

log = logging.getLogger(__name__)
BLOCK = re.compile(r"layers\.(\d+)\.")
PROBE = [ScoringInput("Which planet is the largest?", "Jupiter."), ScoringInput("Say hi", "Hello! How can I help?")]


class SharedBaseModel(nn.Module):
    """`bottom` once, then each member's `top` and `head`: outputs [items, members]. The interface of
    `RewardHeadModel` that `RewardModel` runs."""

    pooling = "last_token"

    def __init__(self, bottom: nn.Module, tops: list[nn.Module], heads: list[nn.Module], first: nn.Module) -> None:
        super().__init__()
        self.bottom, self.tops, self.heads = bottom, nn.ModuleList(tops), nn.ModuleList(heads)
        self.attention: str | None = first.attention
        self.may_pack: bool = first.may_pack

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        positions = positions_of(attention_mask) if position_ids is None else position_ids
        common = {"attention_mask": attention_mask, "position_ids": positions, "use_cache": False}
        hidden = self.bottom(input_ids=input_ids, **common).last_hidden_state
        return self._members(hidden, last_real_index(attention_mask), common)

    def forward_packed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, spans: invariant.Spans, last: torch.Tensor
    ) -> torch.Tensor:
        common = {"position_ids": position_ids, "use_cache": False, "reward_spans": spans}
        hidden = self.bottom(input_ids=input_ids, **common).last_hidden_state
        return self._members(hidden, last, common, rows=len(last))

    def _members(self, hidden: torch.Tensor, last: torch.Tensor, common: dict[str, Any], rows: int = 0) -> torch.Tensor:
        outputs = []
        for top, head in zip(self.tops, self.heads, strict=True):
            state = top(inputs_embeds=hidden, **common).last_hidden_state
            outputs.append(read_last(state.expand(rows, -1, -1) if rows else state, last, head))
        return torch.cat(outputs, dim=1)


def trained_blocks(paths: Sequence[Path], cache_dir: Path | None) -> tuple[int, ...] | None:
    """The blocks every member retrained (the same ones in each), or None when they cannot share a base: other
    formats, an adapter, a process reward model (its rows hold a read per step), other bases, depths, recipes or
    dtypes, or deltas over other parameters."""
    manifests = [read_manifest(path) for path in paths]
    shapes, deltas = set(), set()
    for path, manifest in zip(paths, manifests, strict=True):
        if manifest is None or manifest.format != "value_head" or manifest.adapter or not manifest.base_model:
            return None
        if manifest.steps is not None:
            return None
        base = resolve_base(manifest.base_model, path, cache_dir)[1]
        shapes.add((base, manifest.num_layers, manifest.dtype, manifest.recipe, manifest.attributes))
        keys: frozenset[str] = frozenset()
        if manifest.backbone_delta:
            with safe_open(str(path / manifest.backbone_delta), framework="pt") as fh:
                keys = frozenset(fh.keys())
        deltas.add(keys)
    if len(shapes) > 1 or len(deltas) > 1:
        return None
    blocks = set()
    for key in next(iter(deltas)):
        if match := BLOCK.match(key):
            blocks.add(int(match[1]))
        elif not key.startswith("norm."):
            return None
    return tuple(sorted(blocks))


def load_shared_base(names: Sequence[str], paths: Sequence[Path], **load: Any) -> RewardModel | None:
    """One model running `paths`' members (named `names`), or None when they cannot share a base; `load`: the
    keywords of `load_reward_model`, the same for every member."""
    blocks = trained_blocks(paths, load.get("cache_dir"))
    if blocks is None:
        return None
    first = load_reward_model(paths[0], **load)
    backbone = first.module.backbone
    if not can_split(backbone) or len(first.readout.labels) != 1 or first.module.pooling != "last_token":
        return None
    cut = blocks[0] if blocks else len(backbone.layers)
    split = DecoderSplit.at(backbone, cut)
    tops, heads, infos = [split.top], [first.module.head], [first.info]
    for path in paths[1:]:
        manifest = read_manifest(path)
        assert manifest is not None
        top = shell(backbone, copy.deepcopy(backbone.layers[cut:]), copy.deepcopy(backbone.norm))
        if manifest.backbone_delta:
            delta = load_file(str(path / manifest.backbone_delta))
            if unexpected := top.load_state_dict({_in_top(k, cut): v for k, v in delta.items()}, strict=False)[1]:
                raise RuntimeError(f"{path}: delta tensors {unexpected[:3]} are not in the shared top blocks")
        head = load_head(path / manifest.head_file, hidden_size(backbone.config)).to(first.device)
        if head.out_features != 1:
            return None
        invariant.blockable(head)
        tops.append(top)
        heads.append(head)
        infos.append(_info_of(first, path, manifest))
    module = SharedBaseModel(split.bottom, tops, heads, first.module).eval()
    fused = RewardModel(
        module, first.encoder, first.pad_id, first.device, first.dtype, first.info, Readout(tuple(names), 0)
    )
    fused.members = tuple(infos)
    probe = first.encoder.encode_batch(PROBE)
    if fused.stock(probe) != first.stock(probe):  # the cut changed the arithmetic (e.g. scaled embeddings)
        log.warning("%s: cutting %s at block %d changes its rewards; served apart", paths[0], type(backbone), cut)
        return None
    log.info("shared base: %s run blocks 0-%d once, then their own %d each", ", ".join(names), cut - 1, len(blocks))
    return fused


def _in_top(key: str, cut: int) -> str:
    """A backbone delta's key in the top shell, whose blocks count from the cut."""
    match = BLOCK.match(key)
    return f"layers.{int(match[1]) - cut}.{key[match.end() :]}" if match else key


def _info_of(first: RewardModel, path: Path, manifest: Manifest) -> ModelInfo:
    """A member's `/info` and model fingerprint, as loaded alone: only its files (and the normalization they
    store) differ from the first's."""
    fingerprint = model_fingerprint(
        path,
        base=first.info.base_model,
        recipe=first.info.recipe,
        readout=first.readout.fingerprint_part(),
        dtype=first.dtype,
        device=first.device,
        attention=first.module.attention,
    )
    update = {"model_path": str(path), "model_fingerprint": fingerprint}
    return first.info.model_copy(update=update | {"checkpoint_normalization": manifest.normalization})
