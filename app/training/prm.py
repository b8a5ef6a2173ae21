"""`reward-server train --prm` and `eval --prm`: a value-head process reward model, trained by binary cross-entropy of
its head's sigmoid at each step's tag, and measured by step accuracy and F1 and ProcessBench's first-error accuracy.

Step-labelled JSONL, one solution a line, in any of three forms:
- `{"prompt": ..., "steps": [...], "labels": [1, 0, ...]}` (1: the step is right);
- math-shepherd's `{"input": "<question> Step 1: ... ки\\nStep 2: ... ки", "label": "... +\\n... -"}`: the steps are the
  input's text between its `ки` tags (the question ends where "Step 1:" begins, else at the first line break), each
  labelled by the `+` or `-` that stands in the label where the input has the tag;
- PRM800K's `{"question": {"problem": ...}, "label": {"steps": [{"completions": [{"text", "rating"}],
  "chosen_completion": i}, ...]}}`: each step's chosen completion (the first one where none was chosen), right when
  its rating is 0 or 1 (neutral counts as right, as in most PRM800K training), up to the last rated step."""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.model.collate import collate
from app.model.recipe import Encoded, ScoringInput, UnreadableItem
from app.model.steps import StepEncoder, StepRule
from app.training.data import DataError
from app.training.optim import length_grouped_batches
from app.training.train import Trainer


@dataclass(frozen=True, slots=True)
class Solution:
    prompt: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]


def parse_solution(row: Any, where: str) -> Solution:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "steps" in row and "labels" in row:
        steps, labels = tuple(map(str, row["steps"])), tuple(int(bool(x)) for x in row["labels"])
        prompt = str(row.get("prompt", ""))
    elif "input" in row and "label" in row:
        parts = str(row["input"]).split("ки")
        at, labels_list = 0, []
        for part in parts[:-1]:  # the label holds one character where the input holds the two of the tag
            at += len(part)
            labels_list.append(int(str(row["label"])[at : at + 1] == "+"))
            at += 1
        head = parts[0]
        cut = head.find("Step 1:") if "Step 1:" in head else head.find("\n") + 1
        prompt, parts[0] = head[:cut].strip(), head[cut:]
        steps, labels = tuple(p.strip() for p in parts[:-1]), tuple(labels_list)
    elif "question" in row and "label" in row:
        prompt = str(row["question"].get("problem", ""))
        kept = []
        for step in row["label"].get("steps") or []:
            completions = step.get("completions") or []
            chosen = step.get("chosen_completion")
            pick = completions[chosen if chosen is not None else 0] if completions else None
            if pick is None or pick.get("rating") is None:
                break
            kept.append((str(pick["text"]), int(pick["rating"] >= 0)))
        steps, labels = tuple(s for s, _ in kept), tuple(label for _, label in kept)
    else:
        raise DataError(f"{where}: not a step-labelled solution (prompt/steps/labels, math-shepherd or PRM800K)")
    if not steps or len(steps) != len(labels):
        raise DataError(f"{where}: {len(steps)} steps and {len(labels)} labels")
    return Solution(prompt, steps, labels)


def load_solutions(path: Path, limit: int | None = None) -> list[Solution]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                out.append(parse_solution(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: invalid JSON ({exc})") from exc
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no solutions")
    return out


def prm_metrics(probabilities: Sequence[Sequence[float]], solutions: Sequence[Solution]) -> dict[str, float]:
    """Step accuracy, F1 of finding wrong steps (p < 0.5), and ProcessBench's first-error figures: the share of
    solutions with an error whose first wrong step is found, of error-free ones called error-free, their harmonic
    mean (its F1)."""
    tp = fp = fn = right = total = 0
    found = [0, 0]  # erroneous, error-free: first error placed right
    counts = [0, 0]
    for probs, solution in zip(probabilities, solutions, strict=True):
        predicted = [int(p >= 0.5) for p in probs]
        for guess, label in zip(predicted, solution.labels, strict=True):
            right += guess == label
            total += 1
            tp += guess == 0 and label == 0
            fp += guess == 0 and label == 1
            fn += guess == 1 and label == 0
        first = lambda marks: next((i for i, m in enumerate(marks) if m == 0), -1)  # noqa: E731
        kind = 1 if first(solution.labels) == -1 else 0
        counts[kind] += 1
        found[kind] += first(predicted) == first(solution.labels)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    erroneous, clean = (found[k] / counts[k] if counts[k] else math.nan for k in (0, 1))
    bench_f1 = 2 * erroneous * clean / (erroneous + clean) if erroneous + clean > 0 else 0.0
    return {
        "solutions": float(len(solutions)),
        "steps": float(total),
        "step_accuracy": right / total,
        "error_f1": f1,
        "first_error_accuracy_erroneous": erroneous,
        "first_error_accuracy_correct": clean,
        "processbench_f1": bench_f1,
    }


class PRMTrainer(Trainer):
    """The pair trainer's backbone, trained blocks, head, optimizer and checkpoint, on steps: each solution one row,
    the head read at its steps' tags (`StepEncoder`), BCE against their labels."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.steps = StepRule(tag=config.step_tag, split=config.step_tag, read="sigmoid")
        self.encoder = StepEncoder(self.recipe, self.tokenizer, self.steps)
        self.split, self.store = None, None  # every step runs the whole row: no frozen-bottom feature cache here

    def step_logits(self, batch: Sequence[Encoded]) -> torch.Tensor:
        b = collate(batch, self.pad_id, self.config.pad_to_multiple_of)
        pairs = [(row, r) for row, item in enumerate(batch) for r in item.reads]
        rows, cols = (torch.tensor(x, dtype=torch.long) for x in zip(*pairs, strict=True))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            out = self.module(b.input_ids, b.attention_mask, b.position_ids, b.token_type_ids, (rows, cols))
        return out[:, 0].float()

    def fitting(self, solutions: Sequence[Solution]) -> tuple[list[Solution], list[Encoded]]:
        """The solutions whose steps fit in max_length, encoded (the others are left out, and counted)."""
        kept, encoded = [], []
        for solution in solutions:
            try:
                encoded += self.encoder.encode_batch([ScoringInput(solution.prompt, "", steps=solution.steps)])
                kept.append(solution)
            except UnreadableItem:
                continue
        if len(kept) < len(solutions):
            print(f"left out {len(solutions) - len(kept)} solutions whose steps do not fit", file=sys.stderr)
        return kept, encoded

    @torch.no_grad()
    def probabilities(self, encoded: Sequence[Encoded], batch: int = 16) -> list[list[float]]:
        self.module.eval()
        out: list[list[float]] = []
        for start in range(0, len(encoded), batch):
            chunk = encoded[start : start + batch]
            flat = torch.sigmoid(self.step_logits(chunk)).tolist()
            for item in chunk:
                out.append(flat[: len(item.reads)])
                flat = flat[len(item.reads) :]
        return out

    def train(self, command: str | None = None) -> dict[str, object]:
        import time

        from tqdm import tqdm

        cfg, started = self.config, time.monotonic()
        self.command = command or " ".join(sys.argv)
        rng = random.Random(cfg.seed)
        train = load_solutions(cfg.train_file, cfg.max_train_pairs)
        dev = load_solutions(cfg.dev_file, cfg.max_dev_pairs) if cfg.dev_file else []
        (train, train_enc), (dev, dev_enc) = self.fitting(train), self.fitting(dev)
        params = self.trained_blocks()
        optim = torch.optim.AdamW(
            [{"params": params, "lr": cfg.lr}, {"params": list(self.module.head.parameters()), "lr": cfg.head_lr}],
            weight_decay=cfg.weight_decay,
        )
        trained = [p for g in optim.param_groups for p in g["params"]]
        history: list[dict[str, float]] = []
        best: tuple[float, int] | None = None
        for epoch in range(1, cfg.epochs + 1):
            self.module.train()
            batches = length_grouped_batches([len(e) for e in train_enc], cfg.batch_pairs, rng)
            loss_avg = 0.0
            for step, idx in enumerate(tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", file=sys.stderr), start=1):
                logits = self.step_logits([train_enc[i] for i in idx])
                labels = torch.tensor([x for i in idx for x in train[i].labels], dtype=torch.float32)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, 1.0)
                optim.step()
                optim.zero_grad(set_to_none=True)
                value = float(loss.detach())
                loss_avg = 0.9 * loss_avg + 0.1 * value if step > 1 else value
            record: dict[str, float] = {"epoch": epoch, "train_loss": loss_avg}
            if dev_enc:
                record.update({f"dev_{k}": v for k, v in prm_metrics(self.probabilities(dev_enc), dev).items()})
            history.append(record)
            score = record.get("dev_step_accuracy", -loss_avg)
            if best is None or score > best[0]:
                best = (score, epoch)
                self.save(history, temperature=None)
        assert best is not None
        summary = {"best_epoch": best[1], "history": history, "train_seconds": time.monotonic() - started}
        (cfg.output / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def prm_report(model_path: Path, data: Path, out: Path, dtype: str, device: str, limit: int | None) -> str:
    """`reward-server eval --prm`: the checkpoint's step rewards on `data` as the server computes them; writes
    `report.json` and `summary.md` to `out` and returns the summary."""
    from app.engine.offline import outputs_offline
    from app.model.loading import load_reward_model

    model = load_reward_model(model_path, dtype=dtype, device=device)
    if model.readout.steps is None:
        raise DataError(f"{model_path} is not a process reward model (no step rule)")
    solutions = load_solutions(data, limit)
    rows = outputs_offline(model, [ScoringInput(s.prompt, "", steps=s.steps) for s in solutions])
    metrics = prm_metrics([model.readout.step_rewards(row) for row in rows], solutions)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"model": str(model_path), "data": str(data), **metrics}, indent=1))
    lines = [f"# {model_path} on {data.name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if not v.is_integer() else f"| {k} | {v:.0f} |" for k, v in metrics.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)
