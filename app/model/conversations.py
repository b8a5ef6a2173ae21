"""Conversations as the recipe reads them, and text read back into one: HH-RLHF transcripts (`Human: ...`) and
sequences a chat template rendered (OpenRLHF sends the policy's rendering; the reward model's recipe must render
the conversation its own way)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from transformers import PreTrainedTokenizerBase


class Message(TypedDict):
    role: str
    content: str


Prompt = str | list[Message]

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|System): ")
_ROLE_OF = {"Human": "user", "Assistant": "assistant", "System": "system"}
_NAME_OF = {v: k for k, v in _ROLE_OF.items()}


def is_transcript(text: str) -> bool:
    return text.startswith(("Human: ", "System: "))


def parse_transcript(text: str) -> list[Message] | None:
    """`Human: a\\n\\nAssistant: b\\n\\nHuman: c` -> messages; None when the text is not such a transcript."""
    if not is_transcript(text):
        return None
    parts = _TURN.split(text)
    # parts = ['', 'Human', 'a', 'Assistant', 'b', ...]
    return [Message(role=_ROLE_OF[parts[i]], content=parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def transcript_turns(text: str) -> int:
    """How many messages `parse_transcript` would read from `text` (0 when it is not a transcript), without
    building them: a limit is checked before the work it bounds."""
    if not is_transcript(text):
        return 0
    return sum(1 for _ in _TURN.finditer(text))


def render_transcript(messages: list[Message]) -> str:
    """The inverse of `parse_transcript`, for recipes without a chat template."""
    return "\n\n".join(f"{_NAME_OF.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


@dataclass(frozen=True)
class ChatFormat:
    """How a chat template writes a conversation, enough to read a rendered one back: each role's header and end
    (the text right before and after its content), the tokens a sequence may start with (BOS) or end with (EOS,
    padding), and whether the template trims contents (so a reading trims them too)."""

    name: str
    turns: dict[str, tuple[str, str]]  # role as written -> (header, end)
    leading: tuple[str, ...] = ()
    trailing: tuple[str, ...] = ()
    trim: bool = False
    roles: dict[str, str] = field(default_factory=dict)  # role as written -> role (Gemma's "model")

    def read(self, text: str, pads: Sequence[str] = ()) -> list[Message] | None:
        """The conversation `text` encodes, ending with the assistant's reply; None when it is not in this format."""
        text = _strip_ends(text, (*self.leading, *pads), (*self.trailing, *pads, *{e for _, e in self.turns.values()}))
        messages: list[Message] = []
        pos = 0
        while pos < len(text):
            turn = self._turn_at(text, pos, messages)
            if turn is None:
                return None
            role, start = turn
            end_marker = self.turns[role][1]
            end = text.find(end_marker, start) if end_marker else -1
            stop = end if end >= 0 else len(text)
            content = text[start:stop]
            messages.append(Message(role=self.roles.get(role, role), content=content.strip() if self.trim else content))
            pos = stop + len(end_marker) if end >= 0 else stop
            while text.startswith("\n", pos):
                pos += 1
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            return None
        return messages

    def _turn_at(self, text: str, pos: int, before: list[Message]) -> tuple[str, int] | None:
        """The role whose header starts at `pos`; an empty header (Mistral's replies) only right after a user turn."""
        for role, (header, _) in self.turns.items():
            if header and text.startswith(header, pos):
                return role, pos + len(header)
        for role, (header, _) in self.turns.items():
            if not header and before and before[-1]["role"] == "user":
                return role, pos
        return None


def repeats(text: str, token: str, start: int, end: int, at_end: bool = True) -> int:
    """How many times `token` repeats at the end (or the start) of `text[start:end]`: galloping then bisecting, a
    few C comparisons, where stripping one copy at a time costs a Python step per pad (150k pads: seconds)."""
    matches = text.endswith if at_end else text.startswith

    def fits(k: int) -> bool:
        return k * len(token) <= end - start and matches(token * k, start, end)

    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _strip_ends(text: str, leading: Sequence[str], trailing: Sequence[str]) -> str:
    """Without the BOS and left padding before the first turn, nor the EOS/padding (and newlines between them)
    after the reply. Moves two indices and copies once: linear in the text, however many pads it ends with."""
    leading, trailing = [t for t in leading if t], [t for t in trailing if t]
    start, end = 0, len(text)
    while lead := next((t for t in leading if text.startswith(t, start, end)), None):
        start += len(lead) * repeats(text, lead, start, end, at_end=False)
    while True:
        if tail := next((t for t in trailing if text.endswith(t, start, end)), None):
            end -= len(tail) * repeats(text, tail, start, end)
            continue
        before = end - repeats(text, "\n", start, end)
        if before < end and any(text.endswith(t, start, before) for t in trailing):
            end = before
            continue
        return text[start:end]


def _same(header: str, end: str, *roles: str) -> dict[str, tuple[str, str]]:
    return {role: (header.format(role=role), end) for role in roles}


KNOWN_FORMATS = (
    ChatFormat(
        "chatml",
        _same("<|im_start|>{role}\n", "<|im_end|>", "system", "user", "assistant", "tool"),
        trailing=("<|endoftext|>",),
    ),
    ChatFormat(
        "llama3",
        _same("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", "system", "user", "assistant", "ipython"),
        leading=("<|begin_of_text|>",),
        trailing=("<|end_of_text|>", "<|finetune_right_pad_id|>"),
        trim=True,
        roles={"ipython": "tool"},
    ),
    ChatFormat(
        "gemma",
        _same("<start_of_turn>{role}\n", "<end_of_turn>", "user", "model", "system"),
        leading=("<bos>", "<pad>"),
        trailing=("<eos>", "<pad>"),
        trim=True,
        roles={"model": "assistant"},
    ),
    ChatFormat(
        "mistral",
        {
            "system": ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
            "user": ("[INST]", "[/INST]"),
            "assistant": ("", "</s>"),
        },
        leading=("<s>",),
        trailing=("<pad>",),
        trim=True,
    ),
)


def own_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat | None:
    """The checkpoint's own chat template as a `ChatFormat`, found by rendering marked contents; None when it does
    not write turns as header + content + end (or has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = {"system": "\ue000S\ue000", "user": "\ue000U\ue000", "assistant": "\ue000A\ue000", "next": "\ue000N\ue000"}

    def render(roles: Sequence[str], generation_prompt: bool = False) -> str:
        messages = [{"role": "user" if r == "next" else r, "content": mark[r]} for r in roles]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))

    def after(text: str, role: str) -> str:
        return text.partition(mark[role])[2]

    try:
        plain, prompted = render(["user"]), render(["user"], True)
        pair, three = render(["user", "assistant"]), render(["user", "assistant", "next"])
    except Exception:  # noqa: BLE001 (a template that cannot render this conversation: nothing to derive)
        return None
    reply_end = after(pair, "assistant").rstrip("\n")
    # the header of a user turn, read off the second one (the first may follow a default system prompt)
    user_header = after(three, "assistant").partition(mark["next"])[0].removeprefix(reply_end).lstrip("\n")
    if not (prompted.startswith(plain) and user_header and reply_end):
        return None
    bos = tokenizer.bos_token or ""
    if bos in user_header:  # a "BOS" that opens every turn (SmolLM2's <|im_start|>) is part of each header
        bos = ""
    turns = {
        "user": (user_header, after(plain, "user").rstrip("\n")),
        "assistant": (prompted[len(plain) :], reply_end),
    }
    try:
        with_system = render(["system", "user"])
        system_header = with_system.partition(mark["system"])[0].removeprefix(bos)
        system_end = after(with_system, "system").partition(user_header + mark["user"])[0].rstrip("\n")
        if system_header and system_end:
            turns["system"] = (system_header, system_end)
    except Exception:  # noqa: BLE001 (no system role, e.g. Gemma's template raises)
        pass
    derived = ChatFormat("checkpoint", turns, leading=(bos,), trailing=(tokenizer.eos_token or "",))
    expected = [Message(role="user", content=mark["user"]), Message(role="assistant", content=mark["assistant"])]
    read = derived.read(pair)
    return derived if turns["user"][1] and read is not None and read[-2:] == expected else None


def chat_formats(tokenizer: PreTrainedTokenizerBase) -> tuple[ChatFormat, ...]:
    """The formats a checkpoint tries, in order: its own first (it reads its own rendering exactly, a system preamble
    the template always writes included, e.g. Llama-3.1's dates) unless it is one of the known ones, then those."""
    own = own_format(tokenizer)
    if own is None or any(all(f.turns.get(r) == t for r, t in own.turns.items()) for f in KNOWN_FORMATS):
        return KNOWN_FORMATS
    return (own, *KNOWN_FORMATS)


def read_query(text: str, formats: Sequence[ChatFormat], pads: Sequence[str] = ()) -> tuple[str, list[Message]] | None:
    """The first format that reads `text` as a conversation ending in the assistant's reply, and that conversation."""
    for chat_format in formats:
        messages = chat_format.read(text, pads)
        if messages is not None:
            return chat_format.name, messages
    return None
