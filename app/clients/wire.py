"""Item-to-wire conversion, written once: the client, the TRL adapter, the CLI and the benchmark all build `/score`
items here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Turns = Sequence[Mapping[str, Any]]
Prompt = str | Turns
Item = Mapping[str, Any] | tuple[Prompt, Prompt]  # a /score item as it is, or (prompt, response)


def _text(content: Any) -> str:
    """Message content as the server's plain string: multimodal part lists keep their text parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return content if isinstance(content, str) else str(content)


def _messages(turns: Turns) -> list[dict[str, Any]]:
    # The server accepts role + content only; TRL messages may carry tool_calls, names, reasoning and so on.
    return [{"role": m.get("role"), "content": _text(m.get("content"))} for m in turns]


def to_item(prompt: Prompt, response: Prompt) -> dict[str, Any]:
    """The /score item for a prompt (text, or the conversation so far) and its reply (text, or the reply's messages,
    as TRL's conversational completions give it): `{"prompt", "response"}` or `{"messages"}`."""
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise TypeError(
                "a text prompt takes a text reply (TRL: prompts and completions both strings or both chats)"
            )
        return {"prompt": prompt, "response": response}
    reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else _messages(response)
    return {"messages": _messages(prompt) + reply}


def item_body(item: Item) -> dict[str, Any]:
    """A client's item argument as the body sends it: a mapping as given, a (prompt, response) tuple converted."""
    return to_item(*item) if isinstance(item, tuple) else dict(item)
