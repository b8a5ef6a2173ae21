"""Frozen-bottom feature caching for top-k training of decoder reward models on a CPU.

When only the top k blocks train, the bottom blocks compute the same hidden states every epoch: run them once per
sequence and train the top blocks on the cached states. A pair is one row, [shared prompt | chosen reply | rejected
reply], whose rejected tokens see the prompt but not the chosen reply (`pair_rows`): the prompt the two sequences
share (their longest common token prefix) is computed once, in the bottom when caching and in the top blocks every
step, and several pairs of like length run in one forward. Exact: the served checkpoint recomputes each sequence
alone and reads the same numbers (tested).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from app.model.recipe import Encoded, common_prefix
from app.model.shapes import padded

ROW_TOKENS = 4096  # padded tokens per bottom forward when caching: matmuls this tall run near the CPU's peak
LAYOUT = "pair-rows-1"  # part of every cache key: another layout computes other rounding


@dataclass(frozen=True, slots=True)
class PairFeatures:
    """Hidden states entering the top blocks: a shared prefix and each side's suffix ([tokens, hidden])."""

    prefix: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    @property
    def length(self) -> int:
        """Tokens of the pair's row."""
        return sum(self.span)

    @property
    def span(self) -> tuple[int, int, int]:
        return self.prefix.shape[0], self.chosen.shape[0], self.rejected.shape[0]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Longest common prefix, leaving at least one token of each side to its suffix."""
    return max(0, min(common_prefix(a, b), min(len(a), len(b)) - 1))


def pair_span(chosen: Encoded, rejected: Encoded) -> tuple[int, int, int]:
    """(shared prefix, chosen suffix, rejected suffix) token counts: the pair's row."""
    p = shared_prefix(chosen.input_ids, rejected.input_ids)
    return p, len(chosen) - p, len(rejected) - p


@dataclass(frozen=True, slots=True)
class PairRows:
    """Pairs laid out one per row, right-padded: the attention mask ([B, 1, W, W], True = may attend), positions
    (each side continues the prompt's), and where each side's last token sits."""

    mask: torch.Tensor
    positions: torch.Tensor
    chosen_last: torch.Tensor
    rejected_last: torch.Tensor

    @property
    def width(self) -> int:
        return self.positions.shape[1]


def pair_rows(spans: Sequence[tuple[int, int, int]], multiple: int = 1) -> PairRows:
    """Causal attention within [prompt | chosen], and within [prompt | rejected] with the chosen tokens masked out."""
    mask, positions = shared_rows([(p, (a, b)) for p, a, b in spans], multiple)
    return PairRows(
        mask=mask,
        positions=positions,
        chosen_last=torch.tensor([p + a - 1 for p, a, _ in spans]),
        rejected_last=torch.tensor([p + a + b - 1 for p, a, b in spans]),
    )


def shared_rows(layouts: Sequence[tuple[int, Sequence[int]]], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [prompt | part 1 | part 2 | ...], right-padded: the attention mask ([B, 1, W, W], True = may attend),
    causal within the prompt and each part, every part seeing the prompt and none of the others (a pair's two
    replies; a problem's solutions), a padding token only itself (a row with nothing to attend to would be NaN); and
    positions, each part continuing the prompt's."""
    width = padded(max(p + sum(parts) for p, parts in layouts), multiple)
    i = torch.arange(width)[:, None]
    j = torch.arange(width)[None, :]
    masks, positions = [], []
    for p, parts in layouts:
        segment = torch.full((width,), -1)  # 0 prompt, k the k-th part, -1 padding
        numbered = [0] * p + [k for k, n in enumerate(parts, start=1) for _ in range(n)]
        segment[: len(numbered)] = torch.tensor(numbered, dtype=torch.long)
        sq, sk = segment[i], segment[j]
        masks.append(((j <= i) & ((sk == 0) | (sk == sq)) & (sq >= 0)) | ((i == j) & (sq < 0)))
        pos = torch.zeros(width, dtype=torch.long)
        pos[:p] = torch.arange(p)
        at = p
        for n in parts:
            pos[at : at + n] = torch.arange(p, p + n)
            at += n
        positions.append(pos)
    return torch.stack(masks)[:, None], torch.stack(positions)


def length_batches(lengths: Sequence[int], budget: int, multiple: int) -> list[list[int]]:
    """Indices in length order, cut into batches of at most `budget` padded tokens (at least one item each)."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if out and padded(lengths[i], multiple) * (len(out[-1]) + 1) <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.inference_mode()
def pair_features(bottom: nn.Module, pairs: Sequence[tuple[Encoded, Encoded]], multiple: int = 1) -> list[PairFeatures]:
    """The bottom blocks' states of several pairs in one forward, each pair's prompt once."""
    spans = [pair_span(c, r) for c, r in pairs]
    rows = pair_rows(spans, multiple)
    ids = torch.zeros(len(pairs), rows.width, dtype=torch.long)
    for row, ((c, r), (p, _, _)) in enumerate(zip(pairs, spans, strict=True)):
        ids[row, : len(c) + len(r) - p] = torch.tensor(c.input_ids + r.input_ids[p:])
    hidden = bottom(input_ids=ids, attention_mask=rows.mask, position_ids=rows.positions, use_cache=False)
    out = []
    for h, (p, a, b) in zip(hidden.last_hidden_state, spans, strict=True):
        out.append(PairFeatures(h[:p].clone(), h[p : p + a].clone(), h[p + a : p + a + b].clone()))
    return out


def top_rewards(top: nn.Module, head: nn.Linear, pairs: Sequence[PairFeatures], multiple: int) -> torch.Tensor:
    """Rewards chosen0, rejected0, chosen1, ... of cached pairs through the trainable top blocks."""
    rows = pair_rows([f.span for f in pairs], multiple)
    embeds = torch.zeros(len(pairs), rows.width, pairs[0].prefix.shape[1])
    for row, f in enumerate(pairs):
        embeds[row, : sum(f.span)] = torch.cat([f.prefix, f.chosen, f.rejected])
    hidden = top(inputs_embeds=embeds, attention_mask=rows.mask, position_ids=rows.positions, use_cache=False)
    index = torch.stack([rows.chosen_last, rows.rejected_last], dim=1).flatten()
    last = hidden.last_hidden_state[torch.arange(len(pairs)).repeat_interleave(2), index]
    return head(last)[:, 0]


class FeatureStore:
    """Pair features on disk, so hyperparameter sweeps on a CPU pay for the frozen blocks once.

    An entry is keyed by the frozen blocks' weights, the layout, the precision and the pair's token ids (which already
    carry the recipe), so any run whose bottom computes the same numbers reuses it: another subset, seed, learning
    rate or epoch count. Each entry keeps the seconds it took to compute, so a run that reuses entries can still state
    its from-scratch time.
    """

    def __init__(self, root: Path, bottom: nn.Module, bf16: bool = False) -> None:
        self.root = root
        precision = "bf16-autocast" if bf16 else "float32"  # bf16 matmuls compute other states
        digest = hashlib.sha256(
            f"{type(bottom).__name__}:{bottom.config.num_hidden_layers}:{LAYOUT}:{precision}".encode()
        )
        for name, tensor in sorted(bottom.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()
        self.reused_seconds = 0.0  # compute time of the entries read back, as measured when they were written

    def _path(self, chosen: Encoded, rejected: Encoded) -> Path:
        ids = json.dumps([self.fingerprint, chosen.input_ids, rejected.input_ids])
        key = hashlib.sha256(ids.encode()).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, chosen: Encoded, rejected: Encoded) -> PairFeatures | None:
        path = self._path(chosen, rejected)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            self.reused_seconds += float(f.metadata()["seconds"])
            return PairFeatures(*(f.get_tensor(name) for name in ("prefix", "chosen", "rejected")))

    def put(self, chosen: Encoded, rejected: Encoded, features: PairFeatures, seconds: float) -> None:
        path = self._path(chosen, rejected)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # a run killed mid-write leaves no entry that looks complete
        tensors = {"prefix": features.prefix, "chosen": features.chosen, "rejected": features.rejected}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"seconds": repr(seconds)})
        partial.replace(path)


def cache_features(
    bottom: nn.Module,
    pairs: Sequence[tuple[Encoded, Encoded]],
    store: FeatureStore | None = None,
    multiple: int = 1,
    progress: Callable[[int], object] = lambda n: None,
) -> list[PairFeatures]:
    """Every pair's features, in order: read from `store` where it has them, the rest computed in batches of like
    length (each entry stored with its share of its batch's seconds, by tokens); `progress(n)` after n more pairs."""
    out: list[PairFeatures | None] = [store.get(c, r) if store else None for c, r in pairs]
    progress(sum(f is not None for f in out))
    missing = [i for i, f in enumerate(out) if f is None]
    lengths = [sum(pair_span(*pairs[i])) for i in missing]
    for batch in length_batches(lengths, ROW_TOKENS, multiple):
        chunk = [pairs[missing[k]] for k in batch]
        started = time.perf_counter()
        features = pair_features(bottom, chunk, multiple)
        seconds = time.perf_counter() - started
        total = sum(lengths[k] for k in batch)
        for k, (c, r), f in zip(batch, chunk, features, strict=True):
            out[missing[k]] = f
            if store:
                store.put(c, r, f, seconds * lengths[k] / total)
        progress(len(batch))
    return [f for f in out if f is not None]
