"""Preference pairs on disk (JSONL) -> `PreferencePair`, with errors that name the file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.model.conversations import Message, Prompt
from app.model.recipe import ScoringInput


class DataError(ValueError):
    """A malformed preference file; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float = 0.0
    dataset: str = ""

    def inputs(self) -> tuple[ScoringInput, ScoringInput]:
        return ScoringInput(self.prompt, self.chosen), ScoringInput(self.prompt, self.rejected)


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}[{i}]: a message needs string 'role' and 'content'")
        out.append(Message(role=m["role"], content=m["content"]))
    return out


def parse_pair(row: Any, where: str) -> PreferencePair:
    """`{"prompt", "chosen", "rejected"}` with strings, or the conversational form where chosen/rejected are message
    lists (the prompt is their shared prefix, or `prompt` as messages); optional `margin` and `dataset`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing '{key}'")
    margin = row.get("margin", 0.0)
    if not isinstance(margin, int | float) or isinstance(margin, bool):
        raise DataError(f"{where}: 'margin' must be a number")
    dataset = str(row.get("dataset", ""))
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, r = _messages(chosen, f"{where}: chosen"), _messages(rejected, f"{where}: rejected")
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise DataError(f"{where}: chosen and rejected must end with the assistant's reply")
        if prompt is None:
            if c[:-1] != r[:-1]:
                raise DataError(f"{where}: chosen and rejected conversations differ before the final reply")
            prompt_value: Prompt = c[:-1]
        else:
            prompt_value = prompt if isinstance(prompt, str) else _messages(prompt, f"{where}: prompt")
        return PreferencePair(prompt_value, c[-1]["content"], r[-1]["content"], float(margin), dataset)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string (or give conversations as message lists)")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise DataError(f"{where}: 'chosen' and 'rejected' must be strings")
    return PreferencePair(prompt, chosen, rejected, float(margin), dataset)


def load_pairs(path: Path | str, limit: int | None = None) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs: list[PreferencePair] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
            pairs.append(parse_pair(row, f"{path}:{number}"))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs
