"""Every GuardConfig field can be set from LangChain, a serve.toml app and the command line."""

from __future__ import annotations

import typing

import pytest

from adapters.langchain import ChatGuardedVLM
from adapters.server.settings import ServerSettings
from guardrail.cli import build_parser
from guardrail.config import GuardConfig
from guardrail.config_flags import _fields, guard_config
from guardrail.service import GuardService

FIELDS = _fields(GuardConfig)


def _other_value(name: str, annotation, default):
    """A valid value of the field that is not its default."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(v for v in typing.get_args(annotation) if v != default)
    if annotation is bool:
        return not default
    if name == "layers":
        return (1, 2)
    if name == "shift_calibration_id":
        return "0f1e2d3c"
    if name == "max_prompt_tokens":
        return 4096
    if annotation is int:
        return default + 3
    if annotation is float:
        return default / 2
    raise AssertionError(f"add a test value for {name}")


def _default(name: str):
    value = GuardConfig().model_dump()
    for part in name.split("."):
        value = value[part]
    return value


def _nested(name: str, value) -> dict:
    head, _, rest = name.partition(".")
    return {head: _nested(rest, value)} if rest else {head: value}


def _read(config: GuardConfig, name: str):
    value = config.model_dump()
    for part in name.split("."):
        value = value[part]
    return tuple(value) if isinstance(value, list) else value


def _flags(name: str, value) -> list[str]:
    flag = "--" + name.removesuffix(".kind").replace(".", "-").replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def test_the_walk_covers_nested_fields():
    names = [name for name, _, _ in FIELDS]
    assert {"alpha", "layers", "corruption.kind", "corruption.seed"} <= set(names)
    assert len(names) == len(GuardConfig.model_fields) + 1  # corruption: kind and seed


@pytest.mark.parametrize("name, annotation", [(n, a) for n, a, _ in FIELDS])
def test_each_field_reaches_langchain_serve_toml_and_the_cli(name, annotation, tiny_vlm, tmp_path):
    value = _other_value(name, annotation, _default(name))
    guard = GuardConfig.model_validate(_nested(name, value))
    chat = ChatGuardedVLM(engine=GuardService(tiny_vlm), app="walk", guard=guard)
    assert _read(chat.guarded_model.config, name) == value

    toml = tmp_path / "serve.toml"
    rendered = repr(list(value)) if isinstance(value, tuple) else repr(value)
    rendered = {True: "true", False: "false"}.get(value, rendered).replace("'", '"')
    head, _, rest = name.partition(".")
    table = f"[apps.a.guard.{head}]\n{rest} = {rendered}" if rest else f"{name} = {rendered}"
    section = "" if rest else "[apps.a.guard]\n"
    toml.write_text(f'model = "m"\n[apps.a]\nkey_sha256 = "k"\n{section}{table}\n')
    app = ServerSettings.from_toml(toml).apps[0]
    assert _read(app.guard, name) == value

    for command in (["chat", "--model", "m", "hi"], ["serve"]):
        args = build_parser().parse_args([*command, *_flags(name, value)])
        assert _read(guard_config(args), name) == value, command


def test_flat_fields_still_fold_into_the_nested_config(tiny_vlm):
    chat = ChatGuardedVLM(engine=tiny_vlm, app="flat", alpha=0.25, mode="sample")
    assert (chat.guard.alpha, chat.guard.mode) == (0.25, "sample")
    assert chat.guarded_model.config == chat.guard
