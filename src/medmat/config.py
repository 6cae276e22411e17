"""Typed parameters from params.yaml.

Each stage declares a dataclass for its section; `load_section` builds it and refuses unknown keys,
so a typo in params.yaml is an error that names the key rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params.yaml problem, with the file and key in the message."""


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found")
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `values`; unknown keys raise ConfigError naming them."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def load_section(cls: type[T], section: str, path: str | os.PathLike = DEFAULT_PARAMS) -> T:
    """`cls` built from section `section` of params.yaml (missing section = all defaults)."""
    params = load_params(path)
    return from_dict(cls, params.get(section), where=f"{path}: section '{section}'")
