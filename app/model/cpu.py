"""What this CPU computes fast: bf16 or not decides the serving dtype, and a timing means little without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")  # how to time an AVX2-only CPU here


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: there bf16 matmuls are ~4x faster than fp32; elsewhere bf16 is emulated and slower."""
    flags = _cpuinfo()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_description() -> str:
    """The CPU a timing was taken on, with the flags that decide float32 and bf16 speed (model cards, benchmarks)."""
    info = _cpuinfo()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    words = set(next((line for line in info.splitlines() if line.startswith("flags")), "").split())
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in words]
    caps = [f"{k}={os.environ[k]}" for k in CAPS if os.environ.get(k)]  # kernels held below what the flags allow
    facts = " ".join(flags) or "none"
    facts += f", kernels capped by {' '.join(caps)}" if caps else ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({facts})"
