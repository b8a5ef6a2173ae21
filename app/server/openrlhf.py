"""OpenRLHF's remote reward protocol (`--remote_rm_url` / `--reward.remote_url` -> POST /get_reward).

OpenRLHF sends each query as the policy's chat template rendered it, special tokens kept, ending in the policy's EOS.
A reward model reads a conversation its own way, so a query in a known template is read back into its conversation
(system prompt included, as the policy saw it) and scored with the checkpoint's recipe; a plain-text prompt is split
off its reply; anything else is scored as the sequence it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, StrictStr, model_validator

from app.model.checkpoint import Normalization
from app.model.conversations import ChatFormat, chat_formats, read_query, repeats
from app.model.recipe import Formatted, Item, RecipeEncoder, ScoringInput
from app.server.scores import EnsembleItemScore, Scores, StepItemScore

TEXT, RAW = "text", "raw"  # a plain-text prompt split off its reply; a sequence scored as it is


@dataclass(frozen=True)
class QueryReader:
    """How one checkpoint reads queries, decided at start-up: the chat formats tried in order (`chat_formats`), its
    special tokens (a prompt holding one is not plain text) and its pad/EOS strings."""

    formats: tuple[ChatFormat, ...]
    special_tokens: tuple[str, ...]
    pads: tuple[str, ...]

    @classmethod
    def for_encoder(cls, encoder: RecipeEncoder) -> QueryReader:
        """Conversations are read back only for a recipe that renders them with a chat template."""
        tokenizer = encoder.tokenizer
        formats = chat_formats(tokenizer) if encoder.recipe.template == "chat" else ()
        pads = tuple(t for t in (tokenizer.pad_token, tokenizer.eos_token) if isinstance(t, str) and t)
        return cls(formats=formats, special_tokens=encoder.special_tokens, pads=pads)

    @property
    def readings(self) -> tuple[str, ...]:
        """Every way a query can be read, in `extra_logs` order."""
        return (*(f.name for f in self.formats), TEXT, RAW)

    def read(self, query: str, prompt: str | None) -> tuple[str, Item]:
        conversation = read_query(query, self.formats, self.pads)
        if conversation is not None:
            name, messages = conversation
            return name, ScoringInput(messages[:-1], messages[-1]["content"])
        if prompt and query.startswith(prompt) and not any(t in prompt for t in self.special_tokens):
            start, end = len(prompt), len(query)  # EOS/pad stripped: the recipe adds its own EOS back
            while trailing := next((t for t in self.special_tokens if t and query.endswith(t, start, end)), None):
                end -= len(trailing) * repeats(query, trailing, start, end)  # a run of pads at once
            return TEXT, ScoringInput(prompt, query[start:end])
        return RAW, Formatted(query, prompt=prompt)


class GetRewardRequest(BaseModel):
    """OpenRLHF's body; unknown fields are ignored as OpenRLHF may add some."""

    query: list[StrictStr]
    prompts: list[StrictStr] | None = None
    labels: list[Any] | None = None

    @model_validator(mode="after")
    def _aligned(self) -> GetRewardRequest:
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(f"prompts has {len(self.prompts)} entries for {len(self.query)} queries")
        return self

    def to_inputs(self, reader: QueryReader) -> tuple[list[str], list[Item]]:
        """How each query was read, and what is scored for it."""
        read = [reader.read(q, self.prompts[i] if self.prompts else None) for i, q in enumerate(self.query)]
        return [name for name, _ in read], [item for _, item in read]


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(
        description="numbers only (OpenRLHF turns each into a tensor): tokens read, truncation, and a 0/1 column "
        "per reading (`reward_read_as_<name>`)"
    )
    read_as: list[str] = Field(description="per query: the chat format it was read in, `text` or `raw`")
    normalization: Normalization | None = Field(None, description="when set, rewards are (raw - mean) / std")
    step_rewards: list[list[float]] | None = Field(None, description="a process reward model's, per query")
    model: str
    fingerprint: str

    @classmethod
    def build(cls, scores: Scores, read_as: list[str], readings: Sequence[str]) -> GetRewardResponse:
        items, rewards, normalization = scores.items, scores.rewards, scores.normalization
        logs = {
            "reward_num_tokens": [float(i.num_tokens) for i in items],
            "reward_truncated": [float(i.truncated) for i in items],
            "reward_monitor_warnings": [float(len(scores.warnings))] * len(items),  # for the run (`?run=` in the URL)
        }
        if items and isinstance(items[0], EnsembleItemScore):  # an ensemble: its spread, and each member's reward
            logs["reward_std"] = [i.std for i in items if isinstance(i, EnsembleItemScore)]
            for name in items[0].members:
                logs[f"reward_member_{name}"] = [i.members[name] for i in items if isinstance(i, EnsembleItemScore)]
        steps = [i.step_rewards for i in items if isinstance(i, StepItemScore)] or None
        if steps:  # a process reward model: one number per query each (OpenRLHF stacks them into tensors)
            logs["reward_steps"] = [float(len(s)) for s in steps]
            logs["reward_step_min"] = [min(s) for s in steps]
            logs["reward_step_mean"] = [sum(s) / len(s) for s in steps]
            logs["reward_step_last"] = [s[-1] for s in steps]
        for reading in readings:  # the same keys in every response: OpenRLHF stacks them across samples
            logs[f"reward_read_as_{reading}"] = [float(name == reading) for name in read_as]
        return cls(
            rewards=rewards,
            scores=rewards,
            read_as=read_as,
            normalization=normalization,
            step_rewards=steps,
            extra_logs=logs,
            model=scores.model,
            fingerprint=scores.fingerprint,
        )
