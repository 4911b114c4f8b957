"""Command-line flags made from :class:`GuardConfig`'s fields, so that a new setting reaches
every command (and ``guardrail serve``) at once.

Each field becomes ``--field-name`` (booleans also ``--no-field-name``); a nested config's
fields become ``--field-sub``, except its ``kind``, which takes the field's own name
(``--corruption noise --corruption-seed 3``). Flags left unset keep the base config's value.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel

from guardrail.config import GuardConfig

_PREFIX = "guard_"  # argparse destinations of generated flags


def add_guard_flags(
    parser: argparse.ArgumentParser,
    skip: Collection[str] = (),
    aliases: Mapping[str, str] = {},
) -> None:
    """Add a flag for each ``GuardConfig`` field not in ``skip`` (dotted for nested fields);
    ``aliases`` adds older spellings (``{"corruption.seed": "--seed"}``)."""
    group = parser.add_argument_group("guard (GuardConfig)")
    for name, annotation, description in _fields(GuardConfig):
        if name in skip:
            continue
        flag = "--" + name.removesuffix(".kind").replace(".", "-").replace("_", "-")
        flags = [flag, *([aliases[name]] if name in aliases else [])]
        options: dict[str, Any] = {"dest": _PREFIX + name, "default": None, "help": description}
        if annotation is not bool:
            options["metavar"] = name.rpartition(".")[2].upper()
        choices = _choices(annotation)
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif choices:
            options["choices"] = choices
        elif _is_int_tuple(annotation):
            options.update(type=int, nargs="+")
        else:
            options["type"] = _scalar(annotation)
        group.add_argument(*flags, **options)


def guard_config(args: argparse.Namespace, base: GuardConfig | None = None) -> GuardConfig:
    """``base`` (default: the defaults) with every guard flag given on the command line."""
    values: dict[str, Any] = (base or GuardConfig()).model_dump()
    for dest, value in vars(args).items():
        if not dest.startswith(_PREFIX) or value is None:
            continue
        *path, last = dest.removeprefix(_PREFIX).split(".")
        target = values
        for part in path:
            target = target[part]
        target[last] = tuple(value) if isinstance(value, list) else value
    return GuardConfig.model_validate(values)


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, str]]:
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _fields(annotation, f"{prefix}{name}.")
        else:
            found.append((prefix + name, annotation, field.description or ""))
    return found


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return None


def _is_int_tuple(annotation: Any) -> bool:
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    return any(typing.get_origin(option) is tuple for option in (*options, annotation))


def _scalar(annotation: Any) -> type:
    if isinstance(annotation, types.UnionType):  # an optional scalar: X | None
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        annotation = options[0] if len(options) == 1 else annotation
    if annotation in (int, float, str):
        return annotation  # type: ignore[no-any-return]
    raise TypeError(f"no command-line form for a GuardConfig field of type {annotation!r}")
