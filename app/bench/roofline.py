"""The limit a run is judged against: what one large matmul reaches on this machine in the serving dtype, and the
work one token asks of the model.

The bench's roofline fraction is the items' own tokens per second x `flops_per_token` / `matmul_probe`: useful work
(a shared prompt counted for every item that reads it, padding not at all) over the rate of the best-shaped kernel
the hardware runs. Prompt reuse can take it past 1.0; padding, small kernels and Python overhead pull it down.
`linear_rates` says which of these it is: each of the model's own linear shapes, at the rows it is really called with,
against the same probe.
"""

from __future__ import annotations

import time

import torch
from torch import nn

PROBE_SIZE = 2048


def matmul_probe(dtype: torch.dtype, size: int = PROBE_SIZE, repeats: int = 8) -> float:
    """FLOP/s of a [size, size] x [size, size] product in `dtype` on the CPU."""
    return _rate(size, size, size, dtype, repeats)


def linear_rates(backbone: nn.Module, rows: int, dtype: torch.dtype, repeats: int = 8) -> dict[tuple[int, int], float]:
    """FLOP/s of [rows, in] x [in, out] for each distinct (in, out) of the backbone's linears: a batch-invariant
    forward calls every linear with exactly `rows` rows, so this is the rate its matmuls can reach here."""
    return {(k, n): _rate(rows, k, n, dtype, repeats) for k, n in sorted(set(linear_shapes(backbone)))}


def linear_shapes(backbone: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every linear: `nn.Linear` and GPT-2's transposed `Conv1D`, the kinds the invariant mode blocks."""
    from transformers.pytorch_utils import Conv1D

    shapes = []
    for m in backbone.modules():
        if isinstance(m, nn.Linear):
            shapes.append((m.in_features, m.out_features))
        elif isinstance(m, Conv1D):
            shapes.append((m.nx, m.nf))
    return shapes


def _rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """The best of `repeats` after a warm-up (the first call on a shape builds its kernel); the weight transposed, as
    `nn.Linear` passes it."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator).to(dtype), torch.randn(n, k, generator=generator).to(dtype).t()
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - began)
    return 2 * m * k * n / best


def flops_per_token(backbone: nn.Module) -> float:
    """2 FLOPs per weight of every linear layer the backbone runs per token (embeddings are a lookup; the attention
    scores, a few percent at a few hundred tokens, are left out: the fraction errs low)."""
    return float(2 * sum(k * n for k, n in linear_shapes(backbone)))
