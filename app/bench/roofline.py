"""The limit a run is judged against: what one large matmul reaches on this machine in the serving dtype, and the
work one token asks of the model.

The bench's roofline fraction is the items' own tokens per second x `flops_per_token` / `matmul_probe`: useful work
(a shared prompt counted for every item that reads it, padding not at all) over the rate of the best-shaped kernel
the hardware runs. Prompt reuse can take it past 1.0; padding, small kernels and Python overhead pull it down.
"""

from __future__ import annotations

import time

import torch
from torch import nn

PROBE_SIZE = 2048


def matmul_probe(dtype: torch.dtype, size: int = PROBE_SIZE, repeats: int = 8) -> float:
    """FLOP/s of a [size, size] x [size, size] product in `dtype` on the CPU, the best of `repeats` after a warm-up
    (the first call on a shape builds its kernel)."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def flops_per_token(backbone: nn.Module) -> float:
    """2 FLOPs per weight of every linear layer the backbone runs per token (embeddings are a lookup; the attention
    scores, a few percent at a few hundred tokens, are left out: the fraction errs low)."""
    return float(2 * sum(m.weight.numel() for m in backbone.modules() if isinstance(m, nn.Linear)))
