"""vLLM's pooling API (`/classify`, `/pooling`, `/v1/models`), served from our batcher: a vLLM client, or verl's
discriminative reward path, switches by changing its URL.

Request forms are vLLM's (0.15+): `input` as a string, a list of strings, token ids or lists of token ids, or one
conversation as `messages`. A string is a sequence its client formatted (the reward model's template already applied,
as verl does): tokenized as is, `add_special_tokens` defaulting to true (a BOS the text lacks is added, never
doubled), then finished by the checkpoint's recipe (the EOS its training ended on, its truncation). Token ids are the
exact sequence. `messages` are rendered by the recipe, as /score renders them. Unknown fields are ignored. `model`
names a served model, ensemble or alias (a server of one model accepts any name: vLLM clients send their own).
`probs` is sigmoid of the reward (the normalization in force applied first), or the reward itself with
`use_activation: false`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from app.model.recipe import Formatted, Item, ScoringInput
from app.model.reward_model import sigmoid
from app.model.steps import StepRule
from app.server.schemas import Message
from app.server.scores import ItemScore, Scores, StepItemScore


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ChatMessage(Message):
    """An OpenAI chat message: `content` a string or a list of text parts (joined); other keys ignored."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            return "".join(str(p.get("text", "")) for p in value)
        return value


TASKS = ("classify", "token_classify", "reward", "encode")  # the last three: a process reward model's step reads
Input = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class ClassifyRequest(_Lenient):
    """vLLM's ClassificationRequest (completion and chat forms) and PoolingRequest with `task: classify`."""

    model: str | None = None
    input: Input | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for `input`, false for `messages`")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="keep at most this many tokens; -1: the max")
    truncation_side: Literal["left", "right"] | None = Field(None, description="left (default) keeps the end")
    use_activation: bool | None = Field(None, description="true/unset: sigmoid of the reward; false: the reward")
    activation: bool | None = Field(None, description="older vLLM's name for use_activation")
    softmax: bool | None = Field(None, description="older vLLM's name for use_activation")
    task: str | None = Field(
        None,
        description="/pooling only: `classify`; for a process reward model also `token_classify`/`reward`/`encode`",
    )
    request_id: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        if self.input == []:
            raise ValueError("input is empty: give a string, a list of strings or token ids")
        if self.messages is not None:
            if self.messages[-1].role != "assistant":
                raise ValueError("the last message must be the assistant's reply (role 'assistant') to be scored")
            if self.add_special_tokens or self.truncate_prompt_tokens is not None:
                raise ValueError(
                    "messages are rendered and truncated by the checkpoint's recipe: add_special_tokens (a second "
                    "BOS) and truncate_prompt_tokens apply to `input` only"
                )
        if self.task not in (None, *TASKS):
            raise ValueError(f"task {self.task!r}: a reward model serves {', '.join(TASKS)} only")
        return self

    @property
    def activated(self) -> bool:
        flags = (self.use_activation, self.activation, self.softmax)
        return next((flag for flag in flags if flag is not None), True)

    def size(self) -> int:
        """How many items `to_inputs` makes."""
        if self.messages is not None or isinstance(self.input, str):
            return 1
        values = self.input or []
        return 1 if values and isinstance(values[0], int) else len(values)

    def to_inputs(self) -> list[Item]:
        keep, cut = self.truncate_prompt_tokens, self.truncation_side or "left"
        if self.messages is not None:
            turns = [m.plain() for m in self.messages]
            return [ScoringInput(turns[:-1], turns[-1]["content"])]
        special = True if self.add_special_tokens is None else self.add_special_tokens
        values: Sequence[Any] = [self.input] if isinstance(self.input, str) else self.input or []
        if values and isinstance(values[0], int):
            values = [values]  # one sequence of token ids
        return [
            Formatted(v, add_special_tokens=special, keep=keep, cut=cut)
            if isinstance(v, str)
            else Formatted(ids=tuple(v), keep=keep, cut=cut)
            for v in values
        ]


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | list[list[float]] = Field(
        description="the reward; a process reward model's: per step, its head's class probabilities (vLLM's STEP)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData] | list[PoolingData]
    usage: Usage

    @classmethod
    def build(
        cls,
        request: ClassifyRequest,
        scores: Scores,
        pooling: bool = False,
        steps: StepRule | None = None,
    ) -> ClassifyResponse:
        items, values = scores.items, scores.rewards  # the rewards /score would report
        if request.activated:
            values = [sigmoid(v) for v in values]
        data: list[ClassifyData] | list[PoolingData] = (
            [
                PoolingData(index=i, data=_step_reads(item, steps) or [v])
                for i, (item, v) in enumerate(zip(items, values, strict=True))
            ]
            if pooling
            else [ClassifyData(index=i, label="LABEL_0", probs=[v], num_classes=1) for i, v in enumerate(values)]
        )
        tokens = sum(i.num_tokens for i in items)
        prefix = "pool" if pooling else "classify"
        return cls(
            id=f"{prefix}-{request.request_id or uuid.uuid4().hex}",
            created=int(time.time()),
            model=scores.model,
            data=data,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )


def _step_reads(item: ItemScore, steps: StepRule | None) -> list[list[float]] | None:
    """A process reward model's item as vLLM's STEP pooling returns it: per step, the probability of each class of
    its head (a softmax's two, the positive one where the card reads it; a sigmoid's one)."""
    if not isinstance(item, StepItemScore) or steps is None:
        return None
    if steps.read == "sigmoid":
        return [[p] for p in item.step_rewards]
    return [[p, 1 - p][:: 1 if steps.positive == 0 else -1] for p in item.step_rewards]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reward-server"
    root: str = Field(description="the checkpoint directory; an ensemble's or alias's: what it stands for")
    max_model_len: int
    kind: Literal["model", "ensemble", "alias"] = "model"
    fingerprint: str = Field(description="equal fingerprints give equal rewards")
    format: str | None = Field(None, description="the checkpoint's format (a model's only)")
    dtype: str | None = None
    state: Literal["ready", "stopping", "failed"] = "ready"
    members: list[str] | None = Field(None, description="an ensemble's members")
    aggregate: str | None = Field(None, description="an ensemble's aggregate, with its parameter")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
