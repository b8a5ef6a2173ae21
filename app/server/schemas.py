"""Request and response bodies. Conversions between wire shapes and `ScoringInput` live here, not in routes."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, StrictStr, model_validator

from app.model.checkpoint import Normalization
from app.model.conversations import Message as RecipeMessage
from app.model.info import Kernels, ModelInfo
from app.model.recipe import ScoringInput
from app.model.reward_model import sigmoid
from app.model.steps import StepAggregate
from app.server.scores import Items, ItemScore, Scores


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr

    def plain(self) -> RecipeMessage:
        return RecipeMessage(role=self.role, content=self.content)


Conversation = Annotated[list[Message], Field(min_length=1)]


class ScoreItem(_Strict):
    """Either `prompt` + `response`, or `messages` whose last message is the assistant's reply; for a process reward
    model, `steps` may stand for the reply, after `prompt` (or `messages`: the conversation before the reply)."""

    prompt: StrictStr | None = None
    response: StrictStr | None = None
    messages: Conversation | None = None
    steps: Annotated[list[StrictStr], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreItem:
        if self.steps is not None:
            if self.response is not None:
                raise ValueError("give response or steps, not both")
            if (self.prompt is None) == (self.messages is None):
                raise ValueError("steps follow a prompt, or messages (the conversation before the reply): one of them")
        elif self.messages is not None:
            if self.prompt is not None or self.response is not None:
                raise ValueError("give either messages or prompt+response, not both")
            if self.messages[-1].role != "assistant":
                raise ValueError("the last message must be the assistant's reply (role 'assistant')")
        elif self.prompt is None or self.response is None:
            raise ValueError("each item needs prompt and response (strings), or messages")
        return self

    def to_input(self) -> ScoringInput:
        if self.steps is not None:
            prompt = self.prompt if self.prompt is not None else [m.plain() for m in self.messages or []]
            return ScoringInput(prompt, "", steps=tuple(self.steps))
        if self.messages is not None:
            return ScoringInput([m.plain() for m in self.messages[:-1]], self.messages[-1].content)
        assert self.prompt is not None and self.response is not None
        return ScoringInput(self.prompt, self.response)


class _Routed(_Strict):
    model: str | None = Field(None, description="a served model, ensemble or alias (/v1/models); unset: the default")


class _Stepped(_Routed):
    aggregate: StepAggregate | None = Field(
        None, description="a process reward model's: each item's reward from its steps' (unset: the model's default)"
    )


class ScoreRequest(_Stepped):
    items: Annotated[list[ScoreItem], Field(min_length=1)]

    def stepped(self) -> str | None:
        """Where the first `steps` is (None: no item gives them)."""
        return next((f"items[{i}].steps" for i, item in enumerate(self.items) if item.steps is not None), None)

    def size(self) -> int:
        return len(self.items)

    def to_inputs(self) -> list[ScoringInput]:
        return [item.to_input() for item in self.items]


class _Prompted(_Strict):
    """A prompt given as text, or as the conversation before the reply (`messages`): exactly one of them."""

    prompt: StrictStr | None = None
    messages: Conversation | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> _Prompted:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def prompt_value(self) -> str | list[RecipeMessage]:
        return self.prompt if self.prompt is not None else [m.plain() for m in self.messages or []]


class ComparePair(_Prompted):
    """A prompt and two candidate replies."""

    response_a: StrictStr
    response_b: StrictStr

    def to_inputs(self) -> tuple[ScoringInput, ScoringInput]:
        prompt = self.prompt_value()
        return ScoringInput(prompt, self.response_a), ScoringInput(prompt, self.response_b)


class CompareRequest(_Routed):
    pairs: Annotated[list[ComparePair], Field(min_length=1)]

    def size(self) -> int:
        return 2 * len(self.pairs)  # a pair is two items

    def to_inputs(self) -> list[ScoringInput]:
        return [side for pair in self.pairs for side in pair.to_inputs()]


class ScoreResponse(BaseModel):
    rewards: list[float]
    items: Items
    model: str = Field(description="the model (or ensemble) that scored the items")
    fingerprint: str = Field(description="checkpoint + recipe identity; equal fingerprints give equal rewards")
    normalization: Normalization | None = Field(None, description="when set, rewards are (raw - mean) / std")
    warnings: list[str] = Field(
        default_factory=list, description="the reward-hacking monitor's warnings in force for this request's run"
    )

    @classmethod
    def build(cls, scores: Scores) -> ScoreResponse:
        return cls(
            rewards=scores.rewards,
            items=scores.items,
            model=scores.model,
            fingerprint=scores.fingerprint,
            normalization=scores.normalization,
            warnings=scores.warnings,
        )


class PairResult(BaseModel):
    probability: float = Field(description="sigmoid(reward_a - reward_b): Bradley-Terry P(a preferred to b)")
    a: SerializeAsAny[ItemScore]
    b: SerializeAsAny[ItemScore]


class CompareResponse(BaseModel):
    probabilities: list[float]
    pairs: list[PairResult]
    model: str
    fingerprint: str
    warnings: list[str] = Field(
        default_factory=list, description="the reward-hacking monitor's warnings in force for this request's run"
    )

    @classmethod
    def build(cls, scores: Scores) -> CompareResponse:
        """`scores` holds a0, b0, a1, b1, ... as `ComparePair.to_inputs` produced them; always raw rewards."""
        items = scores.raw_items()
        pairs = [
            PairResult(probability=sigmoid(a.reward - b.reward), a=a, b=b)
            for a, b in zip(items[0::2], items[1::2], strict=True)
        ]
        probabilities = [p.probability for p in pairs]
        return cls(
            probabilities=probabilities,
            pairs=pairs,
            model=scores.model,
            fingerprint=scores.fingerprint,
            warnings=scores.warnings,
        )


class RankGroup(_Prompted):
    """Several responses to one prompt (a GRPO/RLOO group); for a process reward model, `steps`: each response's."""

    responses: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    steps: Annotated[list[Annotated[list[StrictStr], Field(min_length=1)]], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> RankGroup:
        if (self.responses is None) == (self.steps is None):
            raise ValueError("give exactly one of responses or steps (a process reward model's, per response)")
        return self

    @property
    def size(self) -> int:
        return len(self.responses or self.steps or [])

    def to_inputs(self) -> list[ScoringInput]:
        prompt = self.prompt_value()
        if self.steps is not None:
            return [ScoringInput(prompt, "", steps=tuple(steps)) for steps in self.steps]
        return [ScoringInput(prompt, response) for response in self.responses or []]


class RankRequest(_Stepped):
    groups: Annotated[list[RankGroup], Field(min_length=1)]
    probabilities: bool = Field(False, description="also return P[i][j] = sigmoid(r_i - r_j) (raw rewards)")
    eps: float = Field(1e-4, gt=0, description="advantages = (r - mean) / (std + eps), as TRL's GRPO")

    def size(self) -> int:
        return sum(group.size for group in self.groups)

    def stepped(self) -> str | None:
        """Where the first `steps` is (None: no group gives them)."""
        return next((f"groups[{i}].steps" for i, g in enumerate(self.groups) if g.steps is not None), None)

    def to_inputs(self) -> list[ScoringInput]:
        return [x for group in self.groups for x in group.to_inputs()]


class GroupResult(BaseModel):
    rewards: list[float]
    mean: float
    std: float = Field(description="sample standard deviation (n - 1), as TRL; 0 for a group of one")
    advantages: list[float]
    loo_baselines: list[float | None] = Field(description="RLOO: mean reward of the other responses")
    ranks: list[int] = Field(description="1 = best; ties share the better rank")
    probabilities: list[list[float]] | None = None
    items: Items


class RankResponse(BaseModel):
    groups: list[GroupResult]
    model: str
    fingerprint: str
    normalization: Normalization | None = None
    warnings: list[str] = Field(
        default_factory=list, description="the reward-hacking monitor's warnings in force for this request's run"
    )

    @classmethod
    def build(cls, request: RankRequest, scores: Scores) -> RankResponse:
        groups, start = [], 0
        for group in request.groups:
            chunk = scores.chunk(start, start + group.size)
            start += group.size
            items, rewards, raw = chunk.items, chunk.rewards, chunk.raw
            n = len(rewards)
            mean = sum(rewards) / n
            std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
            total = sum(rewards)
            groups.append(
                GroupResult(
                    rewards=rewards,
                    mean=mean,
                    std=std,
                    advantages=[(r - mean) / (std + request.eps) for r in rewards],
                    loo_baselines=[(total - r) / (n - 1) if n > 1 else None for r in rewards],
                    ranks=[1 + sum(other > r for other in rewards) for r in rewards],
                    probabilities=[[sigmoid(a - b) for b in raw] for a in raw] if request.probabilities else None,
                    items=items,
                )
            )
        return cls(
            groups=groups,
            model=scores.model,
            fingerprint=scores.fingerprint,
            normalization=scores.normalization,
            warnings=scores.warnings,
        )


class Health(BaseModel):
    status: Literal["ok", "failed"] = "ok"
    failure: str | None = Field(None, description="why the model thread died, when it did")


class Ready(BaseModel):
    ready: bool
    queued_items: int
    status: Literal["starting", "ready", "failed", "stopping"] = Field(description="where the server is")
    stage: str = Field(description="what start-up is doing (loading, measuring kernels), or what stopped it")
    elapsed_s: float = Field(description="seconds since start-up began; once it ended, how long it took")


class Info(ModelInfo):
    normalization: Normalization | None = Field(description="every reward route but /compare; null: raw")
    fingerprint: str = Field(description="equal fingerprints give equal rewards: model, kernels, normalization")
    kernels: Kernels = Field(description="how the model runs a plan: layout, invariance, each linear's calls")
    limits: dict[str, int | float]
