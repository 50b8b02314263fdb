"""Service settings: one frozen dataclass per service, exposed as flags and EPSERVE_* variables.

Every field `foo_bar` becomes the flag `--foo-bar` and the environment variable
`EPSERVE_FOO_BAR` (so Kubernetes manifests can drive every setting). Precedence: flag, then
environment, then the dataclass default. Validation stays in the dataclass' __post_init__.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "EPSERVE_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _base_type(tp: Any) -> type:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse(tp: type, text: str, name: str) -> Any:
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected a boolean, got {text!r}")
    try:
        return tp(text)
    except ValueError as exc:
        raise ValueError(f"{name}: expected {tp.__name__}, got {text!r}") from exc


def add_settings_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        suffix = f" [env {env_name(f.name)}; default {default!r}]"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text + suffix)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text + suffix)


def settings_from(cls: type[T], args: argparse.Namespace | None = None,
                  environ: typing.Mapping[str, str] | None = None) -> T:
    """Build the dataclass from flags, then EPSERVE_* variables, then defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
        if raw is None:
            continue
        values[f.name] = raw if isinstance(raw, tp) else _parse(tp, str(raw), "--" + f.name.replace("_", "-"))
    return cls(**values)
