"""`reward-server bench --ensemble DIR`: a K-member ensemble whose members share a base, scored as one shared-base
model (`app.model.family`: the common blocks once per item) and as K models (each runs the whole base), on the
same items, in one run; the ensemble's items/s side by side, and whether every member's reward is bitwise the same.

The members are made under DIR from `--model` (a value-head checkpoint with trained top blocks, what `reward-server
train` writes): member 0 is it, member k its trained blocks and head moved by seeded noise, so that the members
differ where an ensemble of `train --ensemble` differs. Both ways run the server's plans (`outputs_offline`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from app.bench.workloads import build_workloads
from app.engine.offline import outputs_offline
from app.model.checkpoint import HEAD_FILE, read_manifest
from app.model.family import load_shared_base
from app.model.loading import load_reward_model
from app.model.recipe import ScoringInput
from app.model.reward_model import RewardModel


def make_members(model: Path, root: Path, count: int) -> list[Path]:
    """`count` checkpoints under `root` that share `model`'s base and differ in its trained blocks and head."""
    manifest = read_manifest(model)
    if manifest is None or manifest.format != "value_head" or not manifest.backbone_delta:
        raise SystemExit(f"bench --ensemble: {model} is not a value-head checkpoint with trained blocks")
    paths = []
    for k in range(count):
        path = root / f"member{k}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(model, path, ignore=shutil.ignore_patterns("eval", "*.md"))
        if k:
            generator = torch.Generator().manual_seed(k)
            for name in (manifest.backbone_delta, HEAD_FILE):
                tensors = load_file(str(path / name))
                moved = {
                    n: t + 0.02 * t.float().std() * torch.randn(t.shape, generator=generator)
                    for n, t in tensors.items()
                }
                save_file({n: t.to(tensors[n].dtype).contiguous() for n, t in moved.items()}, str(path / name))
        paths.append(path)
    return paths


def _timed(models: list[RewardModel], items: list[ScoringInput], repeats: int) -> tuple[float, list[list[float]]]:
    """The best of `repeats` runs' seconds to score `items` with every model, and each model's rows."""
    best, rows = float("inf"), []
    for _ in range(repeats):
        began = time.perf_counter()
        rows = [outputs_offline(m, items) for m in models]
        best = min(best, time.perf_counter() - began)
    return best, rows


def report(model: Path, root: Path, count: int, data: Path | None, dtype: str, repeats: int = 3) -> str:
    paths = make_members(model, root, count)
    names = [p.name for p in paths]
    fused = load_shared_base(names, paths, dtype=dtype, device="cpu")
    if fused is None:
        raise SystemExit(f"bench --ensemble: the members made from {model} cannot share a base")
    apart = [load_reward_model(p, dtype=dtype, device="cpu") for p in paths]
    for m in [fused, *apart]:
        m.prepare()
    workloads = build_workloads(fused, data, 8, 8, 1, 1, 0)
    lines = [
        f"{count}-member ensemble over {model} ({fused.info.architecture}, {fused.info.dtype}); its members retrain "
        f"the same top blocks; items from {data.name if data else 'generated pairs'}; best of {repeats} runs",
        "",
        "| workload | items | shared base items/s | apart items/s | shared / apart | members bitwise equal |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("grpo", "shared"):
        items = workloads[name].items
        shared_s, (rows,) = _timed([fused], items, repeats)
        apart_s, alone = _timed(apart, items, repeats)
        same = all([row[k] for row in rows] == [r[0] for r in alone[k]] for k in range(count))
        lines.append(
            f"| {name} | {len(items)} | {len(items) / shared_s:.1f} | {len(items) / apart_s:.1f} | "
            f"{apart_s / shared_s:.2f} | {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines) + "\n"
