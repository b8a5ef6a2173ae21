"""`reward-server train`'s flags, one per `TrainConfig` field: argparse, pydantic and the config only (no torch), so
`--help` stays instant."""

from __future__ import annotations

import argparse
import operator
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def bounded(kind: type, field: FieldInfo, optional: bool) -> Callable[[str], Any]:
    """`kind` plus the field's pydantic bounds, checked by argparse; `none` unsets an optional number."""
    limits = [(op, getattr(m, op)) for m in field.metadata for op in BOUNDS if hasattr(m, op)]

    def convert(text: str) -> Any:
        if optional and kind in (int, float) and text.lower() == "none":
            return None
        value = kind(text)
        for op, bound in limits:
            ok, sign = BOUNDS[op]
            if not ok(value, bound):
                raise argparse.ArgumentTypeError(f"must be {sign} {bound}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of a field annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return (kinds[0] if len(kinds) == 1 else str), len(kinds) < len(get_args(annotation))
    return annotation, False


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (its type, bounds, choices and description), so settings and flags never
    drift apart. Absent flags stay absent (SUPPRESS): TrainConfig's defaults apply, and the help shows them."""
    from app.training.config import TrainConfig

    required = parser.add_argument_group("required")  # listed before the settings, after -h
    settings = parser.add_argument_group("settings (defaults: the recipe of models/default)")
    for name, field in TrainConfig.model_fields.items():
        kind, optional = _flag_type(field.annotation)
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
            shown = "on" if field.default else "off"
        elif get_origin(kind) is Literal:
            options["choices"], shown = get_args(kind), field.default
        else:
            options["type"] = bounded(kind, field, optional)
            none = "none" if kind in (int, float) else "unset"
            shown = none if field.default is None else field.default
        text = (field.description or "").replace("%", "%%")
        if field.is_required():
            required.add_argument(f"--{name.replace('_', '-')}", required=True, help=text, **options)
        else:
            settings.add_argument(f"--{name.replace('_', '-')}", help=f"{text} (default: {shown})", **options)
