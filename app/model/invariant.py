"""Batch-invariant kernels: each item's numbers a function of the item alone, whatever else shares its forward.

Two kernels moved a bf16 reward with its batch (docs/benchmarks.md): a matmul's row can depend on how many rows the
call has (oneDNN, MKL and cuBLAS choose blocking and split reductions by shape), and attention depends on the
padded length and on the mask. So, installed once when the model is loaded (`install`):
- attention runs per item over its own tokens (its prompt's keys at the front of the packed row, and its own):
  the same call whether the item is alone or in any batch (`rowwise_attention`, the backbone's attention
  implementation from then on; without spans it is stock SDPA);
- every linear runs its rows in calls of a shape its rows cannot tell apart (`Blocking`). Whether a kernel's rows
  depend on the call's row count is a property of the CPU or GPU, the dtype and the shape, so `choose` measures it
  per linear shape of the model: where a dense sweep finds rows equal for every count from some small minimum up,
  one call per linear padded to a multiple of 16 (a lone item computes a few rows); elsewhere fixed blocks of
  `FIXED_ROWS` rows, the last one padded with zeros (a fixed shape gives every row the same arithmetic).
Elementwise ops and the per-row norms are row-local already.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from app.model.cpu import cpu_description
from app.model.plan import Span

log = logging.getLogger(__name__)
ATTENTION = "reward_rowwise"
FIXED_ROWS = {"cpu": 512, "cuda": 1024}  # CPU measured (docs/benchmarks.md); accelerators: larger, not measured
SWEEP_ROWS = 512  # the largest call the flexible strategy makes, and the sweep's reference
MULTIPLE = 16  # flexible calls are padded to a multiple of this (few distinct shapes for the kernels' caches)
DRAWS = 4  # random inputs each row count is checked on (see `sweep`)
MEASURE_VERSION = 2  # bump when `sweep` or `rows_stay_put` change what they measure: older memos are then unread


@dataclass(frozen=True, slots=True)
class Blocking:
    """Calls of at most `max_rows` rows, each padded with zero rows up to a multiple of `multiple`, at least
    `min_rows`. Fixed blocks: all three equal."""

    min_rows: int
    multiple: int
    max_rows: int

    def rows(self, n: int) -> int:
        """The rows a call holding `n` real rows computes."""
        return max(self.min_rows, -(-n // self.multiple) * self.multiple)

    def describe(self) -> str:
        if self.min_rows == self.max_rows:
            return f"blocks of {self.max_rows} rows"
        return f"one call of {self.min_rows}-{self.max_rows} rows, padded to a multiple of {self.multiple}"


def blocked_mm(x: torch.Tensor, weight: torch.Tensor, blocking: Blocking) -> torch.Tensor:
    """`x @ weight` ([N, in] x [in, out]) in calls `blocking` shapes."""
    total = x.shape[0]
    out = x.new_empty(total, weight.shape[1])
    for start in range(0, total, blocking.max_rows):
        block = x[start : start + blocking.max_rows]
        rows = blocking.rows(block.shape[0])
        if rows == block.shape[0]:
            torch.mm(block, weight, out=out[start : start + rows])
        else:
            padded = torch.cat((block, block.new_zeros(rows - block.shape[0], block.shape[1])))
            out[start : start + block.shape[0]] = torch.mm(padded, weight)[: block.shape[0]]
    return out


class _Blocked:
    """Mixed into a linear's class (swapped once, at load: parameters, hooks and state-dict names stay as they are).
    `blocking` None: the stock kernel."""

    blocking: Blocking | None = None

    def _blocked(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert self.blocking is not None
        out = blocked_mm(x.reshape(-1, x.shape[-1]), weight, self.blocking)
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], weight.shape[1])


class BlockedLinear(_Blocked, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.blocking is None else self._blocked(x, self.weight.t(), self.bias)


class BlockedConv1D(_Blocked, Conv1D):
    """GPT-2's transposed linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.blocking is None else self._blocked(x, self.weight, self.bias)


BLOCKED: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: BlockedLinear, Conv1D: BlockedConv1D}


class Spans:
    """Where each item's tokens are in a packed row, passed down through the backbone's forward; `reached` counts
    the attention calls that read them (the probe's evidence that the backbone passes its arguments down)."""

    __slots__ = ("reached", "spans")

    def __init__(self, spans: Sequence[Span]) -> None:
        self.spans = tuple(spans)
        self.reached = 0


def rowwise_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    reward_spans: Spans | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface, per span of a packed row; without spans, stock SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if reward_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("batch-invariant attention does not support logit soft-capping (nor does sdpa)")
    reward_spans.reached += 1
    spans = reward_spans.spans
    index, starts, masks = _layout(spans, kwargs.get("sliding_window"), query.dtype, key.device)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.index_select(2, index), value.index_select(2, index)
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    for (_, cached, at, own), start, mask in zip(spans, starts, masks, strict=True):
        q = query[:, :, at : at + own]
        k, v = key[:, :, start : start + cached + own], value[:, :, start : start + cached + own]
        if mask is None:  # SDPA reads grouped heads itself (without a mask, as transformers asks it to)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        else:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        out[0, at : at + own] = o[0].transpose(0, 1)
    return out, None


@functools.lru_cache(maxsize=4)  # the batch in flight, asked again by every layer (per window, where layers differ)
def _layout(
    spans: tuple[Span, ...], window: int | None, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, list[int], list[torch.Tensor | None]]:
    """For one gather of the row's keys: each span's prompt tokens then its own (the index), where each span starts
    there, and each span's causal mask (None where SDPA's own causal flag says the same), additive in `dtype` as SDPA
    would turn a boolean one (so it is turned once per batch, not once per layer)."""
    parts, starts, masks, start = [], [], [], 0
    for cached_at, cached, at, own in spans:
        parts += [torch.arange(cached_at, cached_at + cached), torch.arange(at, at + own)]
        starts.append(start)
        start += cached + own
        mask = None
        if cached or (window and own > window):  # a causal band ending at each query's own position
            mask = torch.ones(own, cached + own, dtype=torch.bool).tril(cached)
            if window:
                mask &= ~torch.ones_like(mask).tril(cached - window)
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf")).to(device)
        masks.append(mask)
    return torch.cat(parts).to(device), starts, masks


def _padding_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's mask where a padded batch gives one; none for a packed row (which would be T x T)."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def install(backbone: nn.Module, head: nn.Module | None) -> bool:
    """Once, at load: an SDPA decoder's attention becomes `rowwise_attention` and its linears (and the head's)
    become blockable (stock until `choose` sets their blocking). False (nothing changed) for other backbones."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, rowwise_attention)
    AttentionMaskInterface.register(ATTENTION, _padding_mask)
    config._attn_implementation = ATTENTION
    for module in (backbone, head):
        if module is not None:
            blockable(module)
    return True


def blockable(module: nn.Module) -> None:
    """`module`'s linears become blockable (stock until `choose` sets their blocking)."""
    for sub in module.modules():
        if type(sub) in BLOCKED:
            sub.__class__ = BLOCKED[type(sub)]


def _weight(linear: nn.Module) -> torch.Tensor:
    """The [in, out] matrix `blocked_mm` multiplies by."""
    return linear.weight if isinstance(linear, Conv1D) else linear.weight.t()


def sweep(weight: torch.Tensor, rows: int = SWEEP_ROWS) -> int | None:
    """The smallest row count from which every call's rows equal the reference's ([rows, in] in one call), over
    counts 1-64 and every multiple of 16 up to `rows`, each at two offsets (a row's place in the call must not
    matter either) and on `DRAWS` inputs; None when no count below `rows` does.

    Several inputs, because a low-precision output hides most of what a different reduction order changes: on an AMX
    Xeon one bf16 shape's 176-row calls differed from the 512-row call on 4 random inputs of 5, so one input passed
    them about one time in five, and a lone item then read differently from the same item in a batch."""
    counts = [*range(1, 65), *range(80, rows, MULTIPLE)]
    inputs = []
    for seed in range(DRAWS):
        x = torch.randn(rows, weight.shape[0], generator=torch.Generator().manual_seed(seed))
        x = x.to(weight.device, weight.dtype)
        inputs.append((x, torch.mm(x, weight)))
    for index in range(len(counts) - 1, -1, -1):  # down from the largest: the first count that moves ends it
        m = counts[index]
        places = {(m * 37) % (rows - m + 1), (m * 37 + 1) % (rows - m + 1)}  # an odd place and its next
        if any(
            not torch.equal(torch.mm(x[at : at + m], weight), ref[at : at + m]) for x, ref in inputs for at in places
        ):
            return counts[index + 1] if index + 1 < len(counts) else None
    return counts[0]  # every call `Blocking.rows` makes from it was swept


def rows_stay_put(weight: torch.Tensor, rows: int) -> bool:
    """Whether a call of exactly `rows` rows gives a row the same numbers wherever it sits in the call (what fixed
    blocks rely on: a row's place in its block follows its place in the packed row), on `DRAWS` inputs."""
    for seed in range(DRAWS):
        x = torch.randn(rows, weight.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
        x = x.to(weight.device, weight.dtype)
        reference = torch.mm(x, weight)
        if not all(torch.equal(torch.mm(x.roll(s, 0), weight), reference.roll(s, 0)) for s in (1, 7, rows // 3)):
            return False
    return True


class Measurements:
    """What `sweep` and `rows_stay_put` found per linear shape, kept across starts in `directory`: a kernel's rows
    behave the same for the same device, torch build, kernel caps and threads, so a second start reads them instead
    of measuring again (about 10 s of a 135M model's start on 2 cores). The probe that follows in
    `RewardModel.prepare` still checks the result bitwise. `directory` None: measure, keep nothing."""

    def __init__(self, directory: Path | None, device: torch.device) -> None:
        self.file = directory / f"{_machine_key(device)}.json" if directory is not None else None
        self.found: dict[str, Any] = {}
        self.dirty = False
        if self.file is not None and self.file.exists():
            try:
                self.found = json.loads(self.file.read_text())
            except (OSError, ValueError):  # unreadable: measured again and rewritten
                log.warning("%s: unreadable kernel measurements, measuring again", self.file)

    def get(self, name: str, measure: Callable[[], Any]) -> Any:
        if name not in self.found:
            self.found[name], self.dirty = measure(), True
        return self.found[name]

    def save(self) -> None:
        if self.file is None or not self.dirty:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            staging = self.file.with_suffix(f".{id(self)}.tmp")
            staging.write_text(json.dumps(self.found, indent=1, sort_keys=True))
            staging.replace(self.file)  # atomic: a racing replica reads either file whole
        except OSError as exc:  # a read-only cache costs the next start its measurement, nothing else
            log.warning("kernel measurements not kept (%s)", exc)


def _machine_key(device: torch.device) -> str:
    """What decides a kernel's arithmetic, hashed: the device, the torch build, the kernel caps and the threads."""
    if device.type == "cuda":
        index = device.index or 0
        hardware = f"{torch.cuda.get_device_name(index)} {torch.cuda.get_device_capability(index)} {torch.version.cuda}"
    else:
        hardware = f"{cpu_description()} {torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} threads"
    facts = f"v{MEASURE_VERSION} {torch.__version__} {device.type} {hardware} {SWEEP_ROWS} {MULTIPLE} {FIXED_ROWS}"
    return hashlib.sha256(facts.encode()).hexdigest()[:24]


def choose(
    module: nn.Module, device_type: str, fixed_rows: int = 0, measured: Measurements | None = None
) -> tuple[dict[str, str], list[str]]:
    """Sets every blockable linear's `Blocking`, measured per (in, out, dtype) or read from `measured`. Returns what
    was chosen, by shape, and the shapes whose rows move even in fixed blocks (then nothing here keeps them
    batch-invariant). `fixed_rows`: fixed blocks of that many rows everywhere, no sweep (0: measure)."""
    fixed = fixed_rows or FIXED_ROWS.get(device_type, FIXED_ROWS["cuda"])
    memo = measured or Measurements(None, torch.device(device_type))
    by_shape: dict[tuple[int, int, torch.dtype], list[_Blocked]] = {}
    for sub in module.modules():
        if isinstance(sub, _Blocked):
            w = _weight(sub)  # type: ignore[arg-type]
            by_shape.setdefault((w.shape[0], w.shape[1], w.dtype), []).append(sub)
    chosen: dict[str, str] = {}
    moving: list[str] = []
    for done, ((n_in, n_out, dtype), linears) in enumerate(sorted(by_shape.items(), key=str), 1):
        name = f"{n_in}x{n_out} {str(dtype).removeprefix('torch.')}"
        weight = _weight(linears[0])  # type: ignore[arg-type]
        began, known = time.perf_counter(), len(memo.found)
        with torch.inference_mode():
            least = None if fixed_rows else memo.get(f"{name} sweep", lambda w=weight: sweep(w))
            flexible = least is not None and least < fixed
            if not flexible and not memo.get(f"{name} stays in {fixed}", lambda w=weight: rows_stay_put(w, fixed)):
                moving.append(name)
        blocking = Blocking(least, MULTIPLE, SWEEP_ROWS) if flexible else Blocking(fixed, fixed, fixed)  # type: ignore[arg-type]
        for linear in linears:
            linear.blocking = blocking
        chosen[name] = blocking.describe()
        if len(memo.found) > known:  # measured, not read: say how far the first start is
            took = time.perf_counter() - began
            log.info("kernels %d/%d measured: %s, %s (%.1f s)", done, len(by_shape), name, chosen[name], took)
    memo.save()
    return chosen, moving


def unblock(module: nn.Module) -> None:
    """Stock kernels for every linear (batch invariance off)."""
    for sub in module.modules():
        if isinstance(sub, _Blocked):
            sub.blocking = None
