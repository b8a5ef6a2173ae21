"""Request and response bodies. Conversions between wire shapes and `ScoringInput` live here, not in routes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from app.ml.recipe import Message as RecipeMessage
from app.ml.recipe import ScoringInput

if TYPE_CHECKING:
    from app.worker import ItemResult


def bradley_terry(reward_a: float, reward_b: float) -> float:
    """P(a preferred to b) = sigmoid(r_a - r_b), computed without overflow for large margins."""
    d = reward_a - reward_b
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr

    def plain(self) -> RecipeMessage:
        return RecipeMessage(role=self.role, content=self.content)


Conversation = Annotated[list[Message], Field(min_length=1)]


class ScoreItem(_Strict):
    """Either `prompt` + `response`, or `messages` whose last message is the assistant's reply."""

    prompt: StrictStr | None = None
    response: StrictStr | None = None
    messages: Conversation | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreItem:
        if self.messages is not None:
            if self.prompt is not None or self.response is not None:
                raise ValueError("give either messages or prompt+response, not both")
            if self.messages[-1].role != "assistant":
                raise ValueError("the last message must be the assistant's reply (role 'assistant')")
        elif self.prompt is None or self.response is None:
            raise ValueError("each item needs prompt and response (strings), or messages")
        return self

    def to_input(self) -> ScoringInput:
        if self.messages is not None:
            return ScoringInput([m.plain() for m in self.messages[:-1]], self.messages[-1].content)
        assert self.prompt is not None and self.response is not None
        return ScoringInput(self.prompt, self.response)


class ScoreRequest(_Strict):
    items: Annotated[list[ScoreItem], Field(min_length=1)]


class ComparePair(_Strict):
    """A prompt (text, or the conversation before the reply as `messages`) and two candidate replies."""

    prompt: StrictStr | None = None
    messages: Conversation | None = None
    response_a: StrictStr
    response_b: StrictStr

    @model_validator(mode="after")
    def _one_prompt(self) -> ComparePair:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def to_inputs(self) -> tuple[ScoringInput, ScoringInput]:
        prompt = self.prompt if self.prompt is not None else [m.plain() for m in self.messages or []]
        return ScoringInput(prompt, self.response_a), ScoringInput(prompt, self.response_b)


class CompareRequest(_Strict):
    pairs: Annotated[list[ComparePair], Field(min_length=1)]


class ItemScore(BaseModel):
    reward: float
    num_tokens: int = Field(description="tokens the model read, after truncation")
    truncated: bool = Field(description="true when the start of the prompt (or reply) was cut to fit max_length")


class ScoreResponse(BaseModel):
    rewards: list[float]
    items: list[ItemScore]
    fingerprint: str = Field(description="checkpoint + recipe identity; equal fingerprints give equal rewards")

    @classmethod
    def build(cls, results: Sequence[ItemResult], fingerprint: str) -> ScoreResponse:
        items = [ItemScore(reward=r.reward, num_tokens=r.num_tokens, truncated=r.truncated) for r in results]
        return cls(rewards=[i.reward for i in items], items=items, fingerprint=fingerprint)


class PairResult(BaseModel):
    probability: float = Field(description="sigmoid(reward_a - reward_b): Bradley-Terry P(a preferred to b)")
    a: ItemScore
    b: ItemScore


class CompareResponse(BaseModel):
    probabilities: list[float]
    pairs: list[PairResult]
    fingerprint: str

    @classmethod
    def build(cls, results: Sequence[ItemResult], fingerprint: str) -> CompareResponse:
        """`results` holds a0, b0, a1, b1, ... as `ComparePair.to_inputs` produced them."""
        items = ScoreResponse.build(results, fingerprint).items
        pairs = [
            PairResult(probability=bradley_terry(a.reward, b.reward), a=a, b=b)
            for a, b in zip(items[0::2], items[1::2], strict=True)
        ]
        return cls(probabilities=[p.probability for p in pairs], pairs=pairs, fingerprint=fingerprint)


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    queued_items: int


class Info(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_path: str
    format: str
    architecture: str
    model_type: str
    pooling: str
    head_index: int
    base_model: str | None
    num_parameters: int
    dtype: str
    device: str
    max_length: int
    recipe: dict[str, Any]
    normalization: dict[str, float] | None
    fingerprint: str
    limits: dict[str, int | float]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
