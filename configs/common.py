"""Helpers shared by the config recipes (parsing `--config=file.py:arg`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from muse_jax import sharding


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "key=value,flag" strings into a ConfigDict over `defaults`.

  A bare word sets a boolean default to True ("tiny"); values take the type
  of their default. Unknown keys are an error naming the key.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    key, sep, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def mesh_and_rules(config: ml_collections.ConfigDict) -> None:
  """Sets the default mesh (all devices data-parallel) and rules table."""
  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  config.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
