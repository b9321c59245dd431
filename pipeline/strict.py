"""The base of every config model: a boolean is refused where a number is expected.

Pydantic reads `true` as 1 for an int field and as 1.0 for a float field, so `train.rounds=true`
would run one round. ConfigModel refuses such a value, also inside a list, tuple or mapping of
numbers, with the key in the error's location. Everything else validates as pydantic does.
"""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

_NUMBERS = (int, float)


def _options(annotation) -> list:
    """The members of a union (Optional included), Annotated stripped; else [annotation]."""
    if get_origin(annotation) is Annotated:
        return _options(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [option for arg in get_args(annotation) for option in _options(arg)]
    return [annotation]


def misplaced_bool(annotation, value) -> str | None:
    """Why `value` holds a boolean where `annotation` expects a number (None when it does not)."""
    options = _options(annotation)
    if isinstance(value, bool):
        if bool in options or Any in options or not any(o in _NUMBERS for o in options):
            return None
        expected = "an integer" if int in options and float not in options else "a number"
        return f"expected {expected}, got the boolean {str(value).lower()}"
    for option in options:
        origin, args = get_origin(option), get_args(option)
        if isinstance(value, (list, tuple)) and origin in (tuple, list) and args:
            for index, item in enumerate(value):
                element = args[0] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else \
                    args[min(index, len(args) - 1)]
                if (why := misplaced_bool(element, item)) is not None:
                    return f"item {index + 1}: {why}"
        if isinstance(value, dict) and origin is dict and len(args) == 2:
            for key, item in value.items():
                if (why := misplaced_bool(args[1], item)) is not None:
                    return f"{key}: {why}"
    return None


class ConfigModel(BaseModel):
    """BaseModel that refuses booleans in number fields (see the module's docstring)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and (why := misplaced_bool(field.annotation, value)) is not None:
            raise ValueError(why)
        return value


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_reasons(error: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, reason) of every error of a ValidationError, the value given appended where
    pydantic's own message does not say it (a model's own checks name their keys themselves)."""
    found = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not str(part).startswith(("function-", "json-or-python")))
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("value_error", "assertion_error", "missing") and "input" in item:
            reason += f" (got {_shown(item['input'])})"
        found.append((key, reason))
    return found


def one_line(error: ValidationError) -> str:
    """A ValidationError as one line: `key: reason; key: reason`."""
    return "; ".join(f"{key}: {reason}" if key and not reason.startswith(key + ".") else reason
                     for key, reason in validation_reasons(error))
