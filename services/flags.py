"""Command-line flags generated from config dataclass fields.

A field declared with ``doc(default, help, ...)`` becomes ``--field-name`` whose help is
its documentation. Field metadata may carry ``choices``, ``nargs`` and ``type`` (a
parser for the flag's text, when the annotation's type cannot parse it). Stdlib only, so
``tandem --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any


def _field_type(f: dataclasses.Field) -> Any:
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing) | {"str": str})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def add_field_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    fields: Iterable[dataclasses.Field],
) -> None:
    """One flag per field: ``--block-size``, ``--enable-prefix-caching/--no-...`` ..."""
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name}
        kind = f.metadata.get("type") or _field_type(f)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, **kwargs
            )
            continue
        for key in ("choices", "nargs"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        parser.add_argument(flag, type=kind, default=f.default, **kwargs)
