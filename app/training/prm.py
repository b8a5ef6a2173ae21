"""`reward-server train --prm` and `eval --prm`: a value-head process reward model, trained by binary cross-entropy of
its head's sigmoid at each step's tag (a problem's solutions on one row after their prompt, computed once), and
measured by step accuracy and F1 and ProcessBench's first-error accuracy.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.model.recipe import Encoded, ScoringInput, UnreadableItem
from app.model.reward_model import read_last
from app.model.steps import StepEncoder, StepRule
from app.training.data import DataError
from app.training.features import ROW_TOKENS, shared_rows
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


@dataclass
class Row:
    """A problem's solutions on one row, its prompt's tokens once (`features.shared_rows`): each solution's own
    tokens, where its steps are read in them, and which solution it is."""

    prompt: list[int]
    parts: list[list[int]] = field(default_factory=list)
    reads: list[list[int]] = field(default_factory=list)
    solutions: list[int] = field(default_factory=list)
    features: torch.Tensor | None = None  # top_k: the frozen blocks' states of the row, computed once

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(map(len, self.parts))


def rows_of(encoded: Sequence[Encoded], budget: int) -> list[Row]:
    """Solutions grouped by their prompt's tokens, as many to a row as fit in `budget` tokens."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(encoded):
        by_prompt.setdefault(tuple(e.input_ids[: e.prefix]), []).append(i)
    rows: list[Row] = []
    for prompt, members in by_prompt.items():
        row: Row | None = None
        for i in members:
            e = encoded[i]
            own = e.input_ids[e.prefix :]
            if row is None or (row.parts and row.length + len(own) > budget):
                row = Row(list(prompt))
                rows.append(row)
            row.parts.append(own)
            row.reads.append([r - e.prefix for r in e.reads])  # a step tag always follows the prompt
            row.solutions.append(i)
    return rows


class PRMTrainer(Trainer):
    """The pair trainer's backbone, trained blocks, head, optimizer and checkpoint, on steps: a problem's solutions on
    one row after its prompt (computed once, as the pair trainer's pairs; top_k: the frozen blocks' states of each row
    once, in memory), the head read at each step's tag (`StepEncoder`), binary cross-entropy against its label."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.steps = StepRule(tag=config.step_tag, split=config.step_tag, read="sigmoid")
        self.encoder = StepEncoder(self.recipe, self.tokenizer, self.steps)
        self.store = None  # the on-disk cache keys pairs; a row's states are kept in memory (`cache`)

    def _layout(self, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
        """`rows` side by side: token ids, attention mask, positions, and where each read is (row, column)."""
        mask, positions = shared_rows(
            [(len(r.prompt), [len(p) for p in r.parts]) for r in rows], self.config.pad_to_multiple_of
        )
        ids = torch.full(positions.shape, self.pad_id, dtype=torch.long)
        at_row: list[int] = []
        at_col: list[int] = []
        for b, row in enumerate(rows):
            flat = row.prompt + [t for part in row.parts for t in part]
            ids[b, : len(flat)] = torch.tensor(flat, dtype=torch.long)
            at = len(row.prompt)
            for part, reads in zip(row.parts, row.reads, strict=True):
                at_row += [b] * len(reads)
                at_col += [at + r for r in reads]
                at += len(part)
        return ids, mask, positions, at_row, at_col

    @torch.inference_mode()
    def cache(self, rows: Sequence[Row], batch: int = 8) -> None:
        """top_k: each row's states below the trained blocks, once (they never change)."""
        if self.split is None:
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):  # as the top blocks run
            for start in range(0, len(rows), batch):
                chunk = rows[start : start + batch]
                ids, mask, positions, _, _ = self._layout(chunk)
                out = self.split.bottom(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                for b, row in enumerate(chunk):
                    row.features = out.last_hidden_state[b, : row.length].clone()

    def step_logits(self, rows: Sequence[Row]) -> torch.Tensor:
        """Every read of `rows`, row by row, solution by solution, step by step."""
        ids, mask, positions, at_row, at_col = self._layout(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            if self.split is not None and all(r.features is not None for r in rows):
                embeds = torch.zeros(*ids.shape, rows[0].features.shape[1])  # type: ignore[union-attr]
                for b, row in enumerate(rows):
                    embeds[b, : row.length] = row.features  # type: ignore[index]
                out = self.split.top(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
            else:
                out = self.module.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            assert self.module.head is not None
            logits = read_last(out.last_hidden_state, torch.tensor(at_col), self.module.head, rows=torch.tensor(at_row))
        return logits[:, 0].float()

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
    def probabilities(self, rows: Sequence[Row], count: int, batch: int = 8) -> list[list[float]]:
        """Each solution's step probabilities, in the solutions' order (`count` of them)."""
        self.module.eval()
        out: list[list[float]] = [[] for _ in range(count)]
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            flat = iter(torch.sigmoid(self.step_logits(chunk)).tolist())
            for row in chunk:
                for i, reads in zip(row.solutions, row.reads, strict=True):
                    out[i] = [next(flat) for _ in reads]
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
        budget = max(ROW_TOKENS // 4, cfg.max_length)  # a row: one problem's solutions, its prompt once
        train_rows, dev_rows = rows_of(train_enc, budget), rows_of(dev_enc, budget)
        self.cache(train_rows)
        self.cache(dev_rows)
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
            batches = length_grouped_batches([r.length for r in train_rows], max(1, cfg.batch_pairs // 4), rng)
            loss_avg = 0.0
            for step, idx in enumerate(tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", file=sys.stderr), start=1):
                batch = [train_rows[i] for i in idx]
                logits = self.step_logits(batch)
                wanted = [x for row in batch for s in row.solutions for x in train[s].labels]
                labels = torch.tensor(wanted, dtype=torch.float32)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, 1.0)
                optim.step()
                optim.zero_grad(set_to_none=True)
                value = float(loss.detach())
                loss_avg = 0.9 * loss_avg + 0.1 * value if step > 1 else value
            record: dict[str, float] = {"epoch": epoch, "train_loss": loss_avg}
            if dev_rows:
                probabilities = self.probabilities(dev_rows, len(dev))
                record.update({f"dev_{k}": v for k, v in prm_metrics(probabilities, dev).items()})
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
