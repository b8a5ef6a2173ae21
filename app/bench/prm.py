"""`reward-server bench --prm DIR`: the `prm` workload (8 problems x 8 solutions of 6-12 steps, a request per
problem) on this server and on the naive one (a padded forward per request), side by side. No process reward model
ships here, so the one measured is made from `--model`: its checkpoint with a step rule (a sigmoid of its value head
at each step's newline), the compute of a value-head PRM of that size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from app.model.checkpoint import MANIFEST, CheckpointError

RULE = {"tag": "\n", "split": "\n", "read": "sigmoid"}


def step_model(model: Path, directory: Path) -> Path:
    """A copy of the value-head checkpoint `model` under `directory`, read at every step (`RULE`)."""
    manifest_file = model / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(f"{model}: --prm makes a process reward model of a value-head checkpoint ({MANIFEST})")
    target = directory / f"{model.name}-prm"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("eval"))
    manifest = json.loads(manifest_file.read_text())
    base = manifest.get("base_model")
    if base and (model / base).exists():  # a base beside the checkpoint: the copy points back at it
        manifest["base_model"] = str((model / base).resolve())
    manifest["steps"] = RULE
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return target
