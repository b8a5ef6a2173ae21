"""Text cut before the tokenizer sees it: a field longer than any `max_length` tokens can come from loses the side
that truncation drops anyway, so tokenizing costs what the model reads, not what the client sent (the Rust tokenizer
keeps ~95 bytes per token until its encodings are freed: 1,024 items of 15k characters took 1.5 GB).

No token covers more characters than the longest token in the vocabulary (`longest_token`); where the tokenizer has
a normalizer, which may compose characters (NFC, NFKC merge at most three into one), the factor `_SLACK` covers it.
A field within its budget is untouched, so every item that fits is tokenized exactly as before; a field past it keeps
`budget` characters on the side truncation keeps, more than the tokens kept from it can span, and the item is
reported truncated as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from app.model.conversations import Message, is_transcript

if TYPE_CHECKING:
    from app.model.recipe import Item

_SLACK = 4  # characters a normalizer may compose into one (Hangul jamo: 3), rounded up
_MARGIN = 256  # characters beyond the budget, so no kept token starts near the cut


def longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters of text one token can stand for (a byte-level token's string has one char per byte)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def char_budget(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slack = 1 if backend is not None and backend.normalizer is None else _SLACK
    return slack * longest_token(tokenizer) * max_length + _MARGIN


def _cut(text: str, budget: int, keep_end: bool) -> str:
    if len(text) <= budget:
        return text
    return text[-budget:] if keep_end else text[:budget]


def cut_item(item: Item, budget: int, keep_end: bool) -> Item:
    """`item` with each free text field cut to `budget` characters, keeping its end (left truncation) or its start.
    A transcript prompt (`Human: ...`) is left whole: cutting it could change how it parses; its size is bounded by
    the request limits."""
    from app.model.recipe import Formatted

    if isinstance(item, Formatted):
        if item.ids is not None or len(item.text) <= budget:
            return item
        return replace(item, text=_cut(item.text, budget, keep_end))
    prompt = item.prompt
    if isinstance(prompt, str):
        if not is_transcript(prompt):
            prompt = _cut(prompt, budget, keep_end)
    elif any(len(m["content"]) > budget for m in prompt):
        prompt = [Message(role=m["role"], content=_cut(m["content"], budget, keep_end)) for m in prompt]
    response = _cut(item.response, budget, keep_end)
    if prompt is item.prompt and response is item.response:
        return item  # the common case: nothing to cut, nothing copied
    return replace(item, prompt=prompt, response=response)


def _chars(item: Item) -> int:
    from app.model.recipe import Formatted

    if isinstance(item, Formatted):
        return len(item.ids) if item.ids is not None else len(item.text)
    prompt = item.prompt if isinstance(item.prompt, str) else "".join(m["content"] for m in item.prompt)
    return len(prompt) + len(item.response)


def chunk_spans(items: Sequence[Item], chunk_chars: int) -> Iterator[tuple[int, int]]:
    """Consecutive `[start, stop)` spans of `items` of about `chunk_chars` characters each (at least one item)."""
    start, size = 0, 0
    for index, item in enumerate(items):
        size += _chars(item)
        if size >= chunk_chars or index == len(items) - 1:
            yield start, index + 1
            start, size = index + 1, 0
