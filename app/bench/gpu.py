"""`reward-server bench --gpu-check DIR`: every check a GPU session owes, in one run that fits 10 minutes on one GPU.

1. loading: a generated ~0.8B bf16 Llama in each format, on the device in bf16 (peak host RSS and device memory, time);
2. invariance: each item's reward alone, batched and in reversed order, for the batch-invariant kernels (with the
   calls the start-up probe chose per linear) and the stock ones, as the largest difference from alone (0.0 is
   bitwise);
3. throughput: this server against the naive one (grpo and storm), on the generated classifier.
Also runs on a CPU (`--device cpu`, a smaller `--load-params`): the same numbers for that machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.bench.load import report as load_report
from app.bench.served import Served
from app.bench.workloads import Result, Workload, synthetic_pairs
from app.engine.offline import score_offline
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel


def invariance(model: RewardModel, inputs: list[ScoringInput]) -> dict[str, float]:
    """Largest |reward - reward alone| over `inputs` batched together and in reversed order, for the batch-invariant
    kernels and the stock ones (each against its own reading alone)."""
    worst: dict[str, float] = {}
    for name, invariant in (("stock kernels", False), ("batch-invariant", True)):  # left prepared invariant
        model.prepare(batch_invariant=invariant)
        alone = [score_offline(model, [x])[0] for x in inputs]
        batched = score_offline(model, inputs)
        reversed_ = score_offline(model, inputs[::-1])[::-1]
        worst[name] = max(abs(a - b) for got in (batched, reversed_) for a, b in zip(got, alone, strict=True))
    return worst


def gpu_check(root: Path, params: float, device: str, port: int) -> str:
    from app.model.loading import load_reward_model

    lines = [load_report(root, params, "bfloat16", device)]
    model = load_reward_model(root / "seq_cls", dtype="bfloat16", device=device)
    pairs = synthetic_pairs(count=16)
    prompts = [p.prompt for p in pairs if isinstance(p.prompt, str)][:8]
    replies = [r for p in pairs for r in (p.chosen, p.rejected)][:8]
    inputs = [ScoringInput(p, r) for p in prompts for r in replies]  # 8 prompts x 8 replies: a GRPO step
    lines += ["", f"Invariance (bf16, {model.device}): max |reward - reward alone| over {len(inputs)} items", ""]
    lines += [f"- {name}: {diff:.3g}" for name, diff in invariance(model, inputs).items()]
    kernels = model.prepared
    lines += ["", "Calls per linear (the start-up probe's choice):", ""]
    lines += [f"- {shape}: {how}" for shape, how in kernels.linears.items()]
    results: list[Result] = []
    workloads = [Workload("grpo", [inputs], 1), Workload("storm", [[x] for x in inputs], 32)]
    for i, mode in enumerate(("server", "naive")):
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"reward-gpu-check-{mode}.log"
        with Served(mode, root / "seq_cls", "bfloat16", port + i, log) as served:
            results += [served.run(model, w) for w in workloads]
    rate = {(r.workload, r.mode): r.items / r.seconds for r in results}
    lines += ["", "Throughput (items/s, bf16):", ""]
    for w in ("grpo", "storm"):
        server, naive = rate[w, "server"], rate[w, "naive"]
        lines.append(f"- {w}: server {server:.1f}, naive {naive:.1f} ({server / naive:.2f}x)")
    return "\n".join(lines) + "\n"
