"""The scoring recipe: the one place that turns a (prompt, response) into the token ids a checkpoint reads.

Training, evaluation and serving all call `RecipeEncoder.encode_batch`, so a sequence is read identically everywhere.
The rules, fixed here and stored with every checkpoint:
- `template`: `concat` (prompt + separator + response), `text_pair` (encoders: the tokenizer's pair template) or
  `chat` (the tokenizer's chat template over the conversation, the response as the final assistant turn).
- special tokens: the tokenizer's own (BOS for Llama, CLS/SEP for BERT), never a doubled BOS; EOS appended when
  `append_eos` and not already last.
- truncation to `max_length` keeps the end: prompt tokens are dropped from the left first, then response tokens
  from the left; tokens the tokenizer added (BOS, CLS, SEP, the appended EOS) and a leading BOS that a chat template
  wrote are never dropped. Reported per item.
- the value head reads the item's last token (`plan.py`, `collate.py`).
A `Formatted` item (a sequence its client formatted: vLLM's `input`, an OpenRLHF query in no known template) skips
the template only; given as token ids it is the exact sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Encoding as RustEncoding
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from app.model.conversations import Message, Prompt, parse_transcript, render_transcript
from app.model.textcut import char_budget, chunk_spans, cut_item

Template = Literal["concat", "text_pair", "chat"]


class UnreadableItem(ValueError):
    """The recipe cannot turn item `index` into tokens; the message says why."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ScoringInput:
    """One thing to score: a prompt (text or the conversation so far) and the reply to it, formatted by the recipe.
    `steps`: a process reward model's steps of the reply, in place of `response` (`app.model.steps`)."""

    prompt: Prompt
    response: str
    steps: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Formatted:
    """A sequence its client formatted itself: an OpenRLHF query in no known template, vLLM's `input`.

    `text` is tokenized as is and finished by the recipe's rules (the EOS training ended on, the recipe's
    truncation); `ids` are the exact tokens, never changed unless `keep` asks. `add_special_tokens`: the tokenizer's
    own BOS/CLS (never doubled); None: the recipe's choice. `keep` (vLLM's `truncate_prompt_tokens`, -1: the
    recipe's max_length) keeps at most that many tokens, cutting on the `cut` side (left keeps the end), in place of
    the recipe's truncation. `prompt`: a leading part of `text` that other items may share (see `Encoded.prefix`).
    """

    text: str = ""
    ids: tuple[int, ...] | None = None
    add_special_tokens: bool | None = None
    keep: int | None = None
    cut: Literal["left", "right"] = "left"
    prompt: str | None = None


Item = ScoringInput | Formatted
Cut = Literal["left", "right", "keep-left", "keep-right"]  # the recipe's truncation, or a client's `keep` side


@dataclass(frozen=True, slots=True)
class Encoded:
    """`prefix`: how many leading tokens are the prompt's own tokens, exactly as they appear in the whole sequence
    (a token that merges prompt and response text is not counted). Items whose first `prefix` tokens are equal
    compute them once (`plan.Plan`); 0 when nothing can be shared. Always < len(input_ids). `reads`: where the head
    is read (a process reward model's step tags); empty: at the last token."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool
    prefix: int = 0
    reads: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)


class ScoringRecipe(BaseModel):
    """Stored in the checkpoint manifest; shown by `/info`; part of the fingerprint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template: Template
    max_length: int = Field(ge=8)
    separator: str = Field("", description="concat only: put between prompt and response")
    add_special_tokens: bool = Field(True, description="let the tokenizer add its BOS/CLS/SEP (never doubled)")
    append_eos: bool = Field(False, description="end every sequence with EOS, as training did")
    eos_separator: str | None = Field(
        None,
        description="append_eos as text, OpenRLHF's way: trailing newlines stripped, then this and the EOS token's "
        "text unless the text already ends with it (None: the EOS id after the last token)",
    )
    system_prompt: str | None = Field(None, description="chat only: prepended when a conversation has none")
    parse_transcripts: bool = Field(
        True, description="read `Human: ... Assistant: ...` prompts as conversations (HH-RLHF style)"
    )
    truncation: Literal["left", "right"] = Field(
        "left",
        description="left: drop the prompt's start first, keep the response end; right: keep the start and end "
        "on EOS (OpenRLHF's training truncation)",
    )
    read_token: Literal["last_real"] = Field("last_real", description="the head reads the last unpadded token")


class RecipeEncoder:
    """A recipe bound to a tokenizer. Thread-safe: encoding uses a private Rust tokenizer with no side state."""

    def __init__(self, recipe: ScoringRecipe, tokenizer: PreTrainedTokenizerBase) -> None:
        if recipe.template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the recipe uses the chat template but the tokenizer has none")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(tokenizer).__name__} has no fast (Rust) tokenizer; convert it to tokenizer.json")
        self.recipe = recipe
        self.tokenizer = tokenizer
        self._rust = Tokenizer.from_str(backend.to_str())
        self._rust.no_truncation()
        self._rust.no_padding()
        self.bos_id: int | None = tokenizer.bos_token_id
        self.eos_id: int | None = tokenizer.eos_token_id
        if (recipe.append_eos or recipe.truncation == "right") and self.eos_id is None:
            raise ValueError("the recipe appends EOS but the tokenizer has no eos_token")
        self.special_tokens: tuple[str, ...] = tuple(tokenizer.all_special_tokens)
        self.template_bos = self._template_bos()
        self.char_budget = char_budget(tokenizer, recipe.max_length)  # characters per field worth tokenizing

    def _template_bos(self) -> str | None:
        """The BOS text every chat rendering starts with, when the template writes one itself: a client asking for
        special tokens gets it back on a text that lacks it (verl strips it; a tokenizer like SmolLM2's adds none)."""
        bos = self.tokenizer.bos_token
        if self.recipe.template != "chat" or not bos:
            return None
        probe = [Message(role="user", content="x"), Message(role="assistant", content="y")]
        try:
            return bos if str(self.tokenizer.apply_chat_template(probe, tokenize=False)).startswith(bos) else None
        except (TemplateError, ValueError):
            return None

    # ---- text -------------------------------------------------------------------------------------
    def _conversation(self, item: ScoringInput) -> list[Message]:
        prompt = item.prompt
        if isinstance(prompt, str):
            parsed = parse_transcript(prompt) if self.recipe.parse_transcripts else None
            turns = parsed if parsed is not None else [Message(role="user", content=prompt)]
        else:
            turns = list(prompt)
        if self.recipe.system_prompt is not None and not any(m["role"] == "system" for m in turns):
            turns.insert(0, Message(role="system", content=self.recipe.system_prompt))
        return [*turns, Message(role="assistant", content=item.response)]

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else render_transcript(prompt)

    def render(self, item: Item) -> str | tuple[str, str]:
        """The text (or text pair) handed to the tokenizer; `encode_batch` tokenizes exactly this."""
        recipe = self.recipe
        if isinstance(item, Formatted):
            text = item.text
            if item.add_special_tokens and self.template_bos and not text.startswith(self.template_bos):
                text = self.template_bos + text  # never doubled: `_finish` drops a BOS the tokenizer adds again
            return self._end(text) if recipe.template != "text_pair" else text
        if recipe.template == "chat":
            return self._end(self.tokenizer.apply_chat_template(self._conversation(item), tokenize=False))
        if recipe.template == "text_pair":
            return (self._prompt_text(item.prompt), item.response)
        return self._end(self._prompt_text(item.prompt) + recipe.separator + item.response)

    def _end(self, text: str) -> str:
        """The text's end as training wrote it before tokenizing (the EOS closing the reply is the last token)."""
        recipe, eos = self.recipe, self.tokenizer.eos_token
        if not recipe.append_eos:
            return text
        if recipe.eos_separator is None:
            return text.rstrip() if recipe.template == "chat" else text
        text = text.rstrip("\n")  # OpenRLHF's RewardDataset (0.11): rstrip("\n"), then " " + eos unless it ends so
        return text if text.endswith(eos) else text + recipe.eos_separator + eos

    def render_prompt(self, item: Item) -> str | None:
        """The text that precedes the response in `render(item)`, when there is one a causal model could share."""
        recipe = self.recipe
        if isinstance(item, Formatted):
            return item.prompt if item.prompt and item.text.startswith(item.prompt) else None
        if recipe.template == "chat":
            before = self._conversation(item)[:-1]  # none: a reply with no prompt turn has nothing to share
            template = self.tokenizer.apply_chat_template
            return template(before, tokenize=False, add_generation_prompt=True) if before else None
        if recipe.template == "concat":
            return self._prompt_text(item.prompt) + recipe.separator
        return None  # text_pair: encoders read both ways, nothing is a prefix

    # ---- tokens -----------------------------------------------------------------------------------
    def _rendered(self, items: Sequence[Item]) -> tuple[list[str | tuple[str, str] | None], list[str | None]]:
        """Every item's text and prompt text (None for exact ids); a conversation its chat template refuses names
        the item."""
        texts: list[str | tuple[str, str] | None] = []
        prompts: list[str | None] = []
        for index, item in enumerate(items):
            if isinstance(item, Formatted) and item.ids is not None:
                texts.append(None)
                prompts.append(None)
                continue
            try:
                texts.append(self.render(item))
                prompts.append(self.render_prompt(item))
            except TemplateError as exc:  # `raise_exception` in the template: roles it does not support, say
                raise UnreadableItem(index, f"the chat template refused it: {exc}") from exc
        return texts, prompts

    def _tokenized(
        self, texts: Sequence[str | tuple[str, str] | None], special: Sequence[bool]
    ) -> list[RustEncoding | None]:
        """One Rust batch call per special-tokens choice; None stays None."""
        out: list[RustEncoding | None] = [None] * len(texts)
        for flag in (True, False):
            todo = [i for i, t in enumerate(texts) if t is not None and special[i] == flag]
            if todo:
                encoded = self._rust.encode_batch([texts[i] for i in todo], add_special_tokens=flag)
                for i, enc in zip(todo, encoded, strict=True):
                    out[i] = enc
        return out

    def encode_batch(self, items: Sequence[Item], chunk_chars: int = 1_000_000) -> list[Encoded]:
        """Each field first cut to what `max_length` tokens can come from (`textcut`), then tokenized `chunk_chars`
        characters at a time: the tokenizer's memory is bounded by the chunk, not by the request."""
        sides = [self._limit(i, item)[1] in ("left", "keep-left") for i, item in enumerate(items)]
        items = [cut_item(item, self.char_budget, keep_end) for item, keep_end in zip(items, sides, strict=True)]
        out: list[Encoded] = []
        for start, stop in chunk_spans(items, chunk_chars):
            try:
                out += self._encode(items[start:stop])
            except UnreadableItem as exc:
                raise UnreadableItem(exc.index + start, exc.reason) from exc
        return out

    def _encode(self, items: Sequence[Item]) -> list[Encoded]:
        default = self.recipe.add_special_tokens and self.recipe.template != "chat"
        special = [
            item.add_special_tokens if isinstance(item, Formatted) and item.add_special_tokens is not None else default
            for item in items
        ]
        texts, prompts = self._rendered(items)
        encodings = self._tokenized(texts, special)
        unique = list(dict.fromkeys((p, f) for p, f in zip(prompts, special, strict=True) if p))
        tokenized = self._tokenized([p for p, _ in unique], [f for _, f in unique])  # a GRPO group's prompt: once
        prompt_ids = {key: enc.ids for key, enc in zip(unique, tokenized, strict=True)}
        out = []
        for index, (item, enc, p, f) in enumerate(zip(items, encodings, prompts, special, strict=True)):
            limit, cut = self._limit(index, item)
            if enc is None:
                out.append(self._exact(index, item.ids, limit, cut))  # type: ignore[union-attr]
            else:
                out.append(self._finish(enc, prompt_ids.get((p, f)) if p else None, limit, cut))
        return out

    def encode(self, item: Item) -> Encoded:
        return self.encode_batch([item])[0]

    def _limit(self, index: int, item: Item) -> tuple[int, Cut]:
        """Where an item is cut: the recipe's max_length and side, or the client's own `keep` (at most max_length)."""
        max_length = self.recipe.max_length
        if not isinstance(item, Formatted) or item.keep is None:
            return max_length, self.recipe.truncation
        keep = max_length if item.keep == -1 else item.keep
        if not 0 < keep <= max_length:
            raise UnreadableItem(index, f"truncate_prompt_tokens={item.keep}: give 1..{max_length} (or -1)")
        return keep, "keep-left" if item.cut == "left" else "keep-right"

    def _exact(self, index: int, ids: Sequence[int], limit: int, cut: Cut) -> Encoded:
        """Token ids as given: checked against the vocabulary, cut only where the client asked."""
        vocab = len(self.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise UnreadableItem(index, f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) > limit and not cut.startswith("keep-"):
            raise UnreadableItem(
                index, f"{len(ids)} tokens; the model reads at most {limit}: set truncate_prompt_tokens to cut them"
            )
        kept = list(ids[-limit:] if cut == "keep-left" else ids[:limit])
        return Encoded(input_ids=kept, token_type_ids=None, truncated=len(kept) < len(ids))

    def _finish(self, enc: RustEncoding, prompt_ids: list[int] | None, limit: int, cut: Cut) -> Encoded:
        ids = list(enc.ids)
        seq = list(enc.sequence_ids)
        types = list(enc.type_ids)
        if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            del ids[1], seq[1], types[1]  # text began with BOS and the tokenizer added another
            if prompt_ids is not None and prompt_ids[:2] == ids[:1] * 2:
                prompt_ids = prompt_ids[1:]
        prefix = common_prefix(ids, prompt_ids) if prompt_ids else 0
        if self.recipe.append_eos and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)  # type: ignore[arg-type]  # checked in __init__
            seq.append(None)
            types.append(types[-1] if types else 0)
        if self.bos_id is not None and ids and ids[0] == self.bos_id and self.bos_id not in ids[1:]:
            # a BOS the chat template wrote is kept through truncation, as one the tokenizer added; a "BOS" that
            # recurs is a turn marker (SmolLM2's bos_token is ChatML's <|im_start|>) and is cut like the text
            seq[0] = None
        excess = len(ids) - limit
        truncated = excess > 0
        if truncated and cut == "right":  # the recipe's right truncation: keep the start; the last token is EOS
            ids, types = ids[:limit], types[:limit]
            ids[-1] = self.eos_id  # type: ignore[call-overload]  # append_eos recipes only (checked in __init__)
            prefix = min(prefix, len(ids) - 1)
        elif truncated:
            # left (the recipe's): the prompt side first, then the response, each from the left; a client's
            # keep-left / keep-right: its text from that side. Special tokens the tokenizer added stay.
            drop: set[int] = set()
            sides = (0,) if cut.startswith("keep-") else (0, 1)
            order = list(range(len(ids)))[:: -1 if cut == "keep-right" else 1]
            for side in sides:
                for i in order:
                    if excess == 0:
                        break
                    if seq[i] == side:
                        drop.add(i)
                        excess -= 1
            keep = [i for i in range(len(ids)) if i not in drop]
            ids = [ids[i] for i in keep]
            types = [types[i] for i in keep]
            prefix -= sum(1 for i in drop if i < prefix)
        token_types = types if self.recipe.template == "text_pair" else None
        return Encoded(ids, token_types, truncated, prefix=max(0, min(prefix, len(ids) - 1)))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
