"""Request bodies decoded off the event loop, each limit applied while the body is read, before the work it protects.

A stock JSON parse builds every value before any limit is checked, in one C call that holds the GIL: 16 MB of empty
items took 0.2-0.5 s of it (and pydantic's validation 3 s more), all while `/health` waited. Here a small reader walks
the body in Python (the GIL passes to the event loop every few milliseconds), strings and numbers parsed by the
standard library's C scanners, and stops at the first array, string or depth past its limit: the cost of a refusal
is bounded by the limits, not by the body. The wire formats' field names say what a value is: a `messages` array is
a conversation (`REWARD_MAX_MESSAGES`), a `prompt`/`prompts` string may be an HH transcript (its turns count as
messages), an array of numbers holds token ids (at most `REWARD_MAX_TEXT_CHARS`), and every other array holds at
most `REWARD_MAX_ITEMS_PER_REQUEST` entries. Validation then runs element by element over the top-level lists.
"""

from __future__ import annotations

import asyncio
import functools
import re
import types
import typing
from collections.abc import Callable, Coroutine
from json.decoder import scanstring
from json.scanner import NUMBER_RE  # type: ignore[attr-defined]
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from app.model.conversations import transcript_turns
from app.server.errors import ErrorType, ServiceError
from app.settings import Settings

MAX_DEPTH = 32  # the deepest request format nests 5 levels (/score's messages' contents)
_SPACE = re.compile(r"[ \t\n\r]*")
_INTEGER = r"[ \t\n\r]*-?(?:0|[1-9]\d{0,17})[ \t\n\r]*"
_LITERALS = {"true": True, "false": False, "null": None}
_TRANSCRIPT_FIELDS = frozenset({"prompt", "prompts"})
M = TypeVar("M", bound=BaseModel)


@functools.lru_cache
def _integer_run(limit: int) -> re.Pattern[str]:
    return re.compile(f"{_INTEGER}(?:,{_INTEGER}){{0,{limit - 1}}}")


class _Invalid(Exception):
    """Not JSON: rendered as one 422 naming the position."""


class _Reader:
    def __init__(self, text: str, settings: Settings) -> None:
        self.text = text
        self.pos = 0
        self.settings = settings

    def skip(self) -> str:
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.text[self.pos : self.pos + 1]

    def expect(self, char: str) -> None:
        if self.skip() != char:
            raise _Invalid(f"expected {char!r} at position {self.pos}")
        self.pos += 1

    def value(self, path: str, key: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ServiceError(ErrorType.validation_error, f"nested deeper than {MAX_DEPTH} levels", param=path or None)
        char = self.skip()
        if char == '"':
            return self.string(path, key)
        if char == "{":
            return self.object(path, depth)
        if char == "[":
            return self.array(path, key, depth)
        number = NUMBER_RE.match(self.text, self.pos)
        if number is not None:
            self.pos = number.end()
            whole, fraction, exponent = number.groups()
            try:
                return float(whole + (fraction or "") + (exponent or "")) if fraction or exponent else int(whole)
            except ValueError:  # more digits than Python converts (int_max_str_digits)
                raise _Invalid(f"number too long at position {number.start()}") from None
        for word, literal in _LITERALS.items():
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return literal
        raise _Invalid(f"unexpected {char!r} at position {self.pos}" if char else "unexpected end of the body")

    def scan(self) -> str:
        """The string whose opening quote is at `pos`, by the standard library's C scanner."""
        try:
            text, self.pos = scanstring(self.text, self.pos + 1, True)
        except ValueError as exc:  # JSONDecodeError: an unterminated string or a bad escape
            raise _Invalid(str(exc)) from None
        return text  # type: ignore[no-any-return]

    def string(self, path: str, key: str) -> str:
        text = self.scan()
        settings = self.settings
        if len(text) > settings.max_text_chars:
            raise ServiceError(
                ErrorType.validation_error,
                f"{len(text)} characters; the limit is {settings.max_text_chars} (REWARD_MAX_TEXT_CHARS)",
                param=path,
            )
        if not text.isascii() and _not_unicode(text):
            raise ServiceError(
                ErrorType.validation_error,
                "not valid Unicode text: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape)",
                param=path,
            )
        if key in _TRANSCRIPT_FIELDS and (turns := transcript_turns(text)) > settings.max_messages:
            raise ServiceError(
                ErrorType.validation_error,
                f"an HH transcript of {turns} turns; the limit is {settings.max_messages} messages "
                "(REWARD_MAX_MESSAGES)",
                param=path,
            )
        return text

    def object(self, path: str, depth: int) -> dict[str, Any]:
        self.pos += 1
        out: dict[str, Any] = {}
        if self.skip() == "}":
            self.pos += 1
            return out
        while True:
            if self.skip() != '"':
                raise _Invalid(f"expected a field name at position {self.pos}")
            key = self.scan()
            self.expect(":")
            out[key] = self.value(f"{path}.{key}" if path else key, key, depth + 1)
            char = self.skip()
            self.pos += 1
            if char == "}":
                return out
            if char != ",":
                raise _Invalid(f"expected ',' or '}}' at position {self.pos - 1}")

    def array(self, path: str, key: str, depth: int) -> list[Any]:
        self.pos += 1
        out: list[Any] = []
        if self.skip() == "]":
            self.pos += 1
            return out
        if (ids := self.integers(path, key)) is not None:
            return ids
        numbers = True
        while True:
            item = self.value(f"{path}[{len(out)}]", key, depth + 1)
            out.append(item)
            numbers = numbers and isinstance(item, int | float) and not isinstance(item, bool)
            self.check_length(path, key, len(out), numbers)
            char = self.skip()
            self.pos += 1
            if char == "]":
                return out
            if char != ",":
                raise _Invalid(f"expected ',' or ']' at position {self.pos - 1}")

    def integers(self, path: str, key: str) -> list[int] | None:
        """An array of plain integers (token ids) read by C calls, not a Python step per id, and no further than its
        limit; None when the array holds anything else, for the general reader."""
        cap = self.settings.max_text_chars
        run = _integer_run(cap).match(self.text, self.pos)
        if run is None:
            return None
        after = self.text[run.end() : run.end() + 1]
        if after == "," and run.group().count(",") + 1 == cap:  # the run stopped at the limit, not at the end
            self.check_length(path, key, cap + 1, numbers=True)
        if after != "]":
            return None
        self.pos = run.end() + 1
        return [int(part) for part in run.group().split(",")]

    def check_length(self, path: str, key: str, length: int, numbers: bool) -> None:
        settings = self.settings
        if key == "messages":
            if length > settings.max_messages:
                raise ServiceError(
                    ErrorType.validation_error,
                    f"more than {settings.max_messages} messages; the limit is {settings.max_messages} "
                    "(REWARD_MAX_MESSAGES)",
                    param=path,
                )
        elif numbers:
            if length > settings.max_text_chars:
                raise ServiceError(
                    ErrorType.payload_too_large,
                    f"more than {settings.max_text_chars} token ids; the limit is {settings.max_text_chars} "
                    "(REWARD_MAX_TEXT_CHARS)",
                    param=path,
                )
        elif length > settings.max_items_per_request:
            raise ServiceError(
                ErrorType.payload_too_large,
                f"more than {settings.max_items_per_request} entries in `{path}`; the limit is "
                f"{settings.max_items_per_request} items per request (REWARD_MAX_ITEMS_PER_REQUEST): split it",
                param=path,
            )


def _not_unicode(text: str) -> bool:
    """JSON may escape a lone surrogate, which no tokenizer can read: the one kind of str that is not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_json(body: bytes, settings: Settings) -> Any:
    """The body's value, or the first limit it breaks (a ServiceError naming the field and the setting)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceError(ErrorType.validation_error, f"the body is not UTF-8 (byte {exc.start})") from None
    reader = _Reader(text, settings)
    try:
        value = reader.value("", "", 0)
        if reader.skip():
            raise _Invalid(f"extra data at position {reader.pos}")
    except _Invalid as exc:
        raise ServiceError(ErrorType.validation_error, f"invalid JSON: {exc}") from None
    return value


def _element_model(annotation: Any) -> type[BaseModel] | None:
    """`list[X]` (or `list[X] | None`) with X a model: the lists validated one element at a time."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else None
    if typing.get_origin(annotation) is list:
        (element,) = typing.get_args(annotation)
        if isinstance(element, type) and issubclass(element, BaseModel):
            return element
    return None


def _located(exc: ValidationError, *prefix: str | int) -> list[dict[str, Any]]:
    return [{**e, "loc": ("body", *prefix, *e["loc"])} for e in exc.errors(include_url=False)]


def validated(model: type[M], data: Any) -> M:
    """`model` from decoded JSON, its top-level lists of models one element per call (each call holds the GIL for
    one item, not for the body); errors located as FastAPI locates them."""
    errors: list[dict[str, Any]] = []
    if isinstance(data, dict):
        data = dict(data)
        for name, field in model.model_fields.items():
            element, value = _element_model(field.annotation), data.get(name)
            if element is None or not isinstance(value, list):
                continue
            checked = []
            for index, entry in enumerate(value):
                try:
                    checked.append(element.model_validate(entry))
                except ValidationError as exc:
                    errors += _located(exc, name, index)
            data[name] = checked
    if not errors:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            errors = _located(exc)
    raise RequestValidationError(errors)


class DecodedRoute(APIRoute):
    """A route whose JSON body `read_json` and `validated` decode on a thread; FastAPI then receives the validated
    model, which it passes through unchanged instead of parsing the body on the event loop."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler
        body_model: type[BaseModel] = model

        async def decoded(request: Request) -> Response:
            settings: Settings = request.app.state.settings
            body = await request.body()
            request._json = await asyncio.to_thread(lambda: validated(body_model, read_json(body, settings)))
            return await handler(request)

        return decoded
