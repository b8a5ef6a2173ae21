"""Process reward models: a reward for every step of a reply, read exactly as each model's card reads it.

A `StepRule` (stored in the manifest as `steps`, shown by `/info`) says how a reply's steps become text and where
the head is read: each step is followed by `tag` and the steps are joined by `joiner`; the head is read at every
token that is the tag's (its last token alone, as the cards look it up); a read becomes the step's probability of
being right by a sigmoid (one output: value-head PRMs) or by the softmax's class `positive` (two: Qwen2.5-Math-PRM,
math-shepherd's `+`/`-` logits). The cards' own rules:
- Qwen2.5-Math-PRM: the chat template, the card's system prompt, `tag="<extra_0>"`, `joiner=""`, softmax class 1;
- math-shepherd: `{question} {step} ки\\n{step} ки`: `tag=" ки"`, `joiner="\\n"`, softmax over (`+`, `-`), class 0;
- a value-head PRM (Skywork-o1-Open-PRM's reading, and what `reward-server train --prm` writes): a sigmoid at each
  step's tag.
Items are encoded as one text by the recipe (`RecipeEncoder`), then read at the tag's positions: so a step reward is
computed in the same packed, batch-invariant forward as any reward. A step whose tag truncation would cut is never
read silently: the item is refused (its steps do not fit)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from app.model.recipe import Encoded, Formatted, Item, RecipeEncoder, ScoringInput, ScoringRecipe, UnreadableItem

StepAggregate = Literal["min", "last", "product", "mean"]
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class StepRule(BaseModel):
    """How a process reward model's steps are written and read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tag: str = Field(description="the text after each step, read at its (last) token")
    joiner: str = Field("", description="between one step's tag and the next step")
    split: str = Field("\n\n", description="how a `response` given whole is cut into steps")
    read: Literal["sigmoid", "softmax"] = Field(description="one output through a sigmoid, or a two-class softmax")
    positive: int = Field(0, ge=0, le=1, description="softmax: the class that means the step is right")
    aggregate: StepAggregate = Field("min", description="the item's reward when a request names no aggregate")
    logits: tuple[str, str] | None = Field(
        None, description="a causal LM read by two tokens' logits: the good and the bad token (math-shepherd's + -)"
    )

    def join(self, steps: Sequence[str]) -> str:
        return self.joiner.join(step + self.tag for step in steps)

    def steps_of(self, response: str) -> tuple[str, ...]:
        """A reply given whole, cut by the rule (empty parts dropped, each stripped of surrounding blank lines)."""
        return tuple(part.strip("\n") for part in response.split(self.split) if part.strip())

    def log_odds(self, outputs: Sequence[float], width: int) -> list[float]:
        """Each read's log-odds that its step is right (a two-class softmax is the sigmoid of the classes'
        difference); `outputs`: the reads' `width` outputs each, in order."""
        reads = [outputs[i : i + width] for i in range(0, len(outputs), width)]
        if self.read == "sigmoid":
            return [r[0] for r in reads]
        return [r[self.positive] - r[1 - self.positive] for r in reads]


QWEN_RULE = StepRule(tag="<extra_0>", read="softmax", positive=1)
SHEPHERD_RULE = StepRule(tag=" ки", joiner="\n", split="\n", read="softmax", positive=0, logits=("+", "-"))


def card_recipe(fmt: str, inferred: ScoringRecipe) -> ScoringRecipe:
    """The recipe a process reward model's card encodes with, where its checkpoint pins none: Qwen's chat template
    with the card's system prompt; a causal LM's `{question} {steps}` with the tokenizer's BOS."""
    if fmt == "process_reward":
        return inferred.model_copy(update={"template": "chat", "system_prompt": QWEN_SYSTEM})
    if fmt == "causal_lm":
        return inferred.model_copy(update={"template": "concat", "separator": " ", "add_special_tokens": True})
    return inferred


def aggregate(step_rewards: Sequence[float], how: StepAggregate) -> float:
    """The item's reward from its steps' (`min`: the weakest step, the usual choice for best-of-n)."""
    if how == "min":
        return min(step_rewards)
    if how == "last":
        return step_rewards[-1]
    if how == "product":
        return math.prod(step_rewards)
    return math.fsum(step_rewards) / len(step_rewards)


class StepEncoder(RecipeEncoder):
    """The recipe's encoder, with each item's read positions: its steps' tags (`Encoded.reads`)."""

    def __init__(self, recipe: ScoringRecipe, tokenizer: PreTrainedTokenizerBase, rule: StepRule) -> None:
        super().__init__(recipe, tokenizer)
        self.rule = rule
        ids = self.tokenizer(rule.tag, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"the step tag {rule.tag!r} is no token of this tokenizer")
        self.tag_id: int = ids[-1]
        probe = self.encode_batch([ScoringInput("1 + 1", "", steps=("One and one.", "That is 2."))])[0]
        if len(probe.reads) != 2:
            raise ValueError(f"the step tag {rule.tag!r} does not tokenize to its own token after a step")

    def encode_batch(self, items: Sequence[Item], chunk_chars: int = 1_000_000) -> list[Encoded]:
        steps = [self._steps(i, item) for i, item in enumerate(items)]
        joined = [
            ScoringInput(item.prompt, self.rule.join(s)) if s is not None and isinstance(item, ScoringInput) else item
            for item, s in zip(items, steps, strict=True)
        ]
        out = []
        for index, (encoded, s) in enumerate(zip(super().encode_batch(joined, chunk_chars), steps, strict=True)):
            found = [at for at, token in enumerate(encoded.input_ids) if token == self.tag_id and at >= encoded.prefix]
            reads = found[: len(s)] if s is not None else found  # a template may close the reply with the tag's token
            if s is not None and len(reads) < len(s):
                raise UnreadableItem(index, f"its {len(s)} steps do not fit in max_length {self.recipe.max_length}")
            if not reads:
                raise UnreadableItem(index, f"no step tag ({self.rule.tag!r}) to read a step reward at")
            out.append(replace(encoded, reads=tuple(reads)))
        return out

    def _steps(self, index: int, item: Item) -> tuple[str, ...] | None:
        """The item's steps (given, or its reply cut by the rule); None for a client-formatted sequence, read at
        every tag it holds (vLLM's STEP pooling: the caller inserted them)."""
        if isinstance(item, Formatted):
            return None
        steps = item.steps if item.steps is not None else self.rule.steps_of(item.response)
        if not steps:
            raise UnreadableItem(index, "no steps: give `steps`, or a response with text")
        tag = self.rule.tag.strip() or self.rule.tag
        bad = next((j for j, step in enumerate(steps) if tag in step), None)
        if bad is not None:
            raise UnreadableItem(index, f"steps[{bad}] holds the step tag {self.rule.tag!r}")
        return steps
