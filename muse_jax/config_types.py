"""The boundary between ml_collections configs and typed module configs.

Config files are untyped ConfigDicts (easy to override from the command line);
modules take frozen dataclasses. Every section crosses here, so a misspelt
key or dtype fails once, with its name, instead of deep inside a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}


def dtype_from_name(name: str | Any) -> Any:
  """`jnp` dtype for a config name ("bfloat16"); dtype objects pass through."""
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {list(_DTYPES)}")
  return _DTYPES[name]


def dataclass_from_config(cls, cfg: Any, **overrides: Any):
  """Builds frozen dataclass `cls` from a mapping, rejecting unknown keys."""
  values = dict(cfg) if cfg is not None else {}
  values.update(overrides)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(
        f"unknown {cls.__name__} config key(s) {unknown}; "
        f"valid keys: {sorted(names)}")
  return cls(**values)
