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


# CPU flags of the bf16 matrix instructions XLA and torch use (x86: AVX-512
# BF16, AMX; Arm: BF16 dot products).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str] | None:
  """The `BF16_CPU_FLAGS` this CPU lists (None: no cpuinfo to read)."""
  try:
    with open(cpuinfo) as f:
      flags = {w for line in f if line.startswith(("flags", "Features"))
               for w in line.split(":", 1)[1].split()}
  except OSError:
    return None
  return sorted(f for f in BF16_CPU_FLAGS if f in flags)


def cpu_compute_dtype(cpuinfo: str = "/proc/cpuinfo") -> str:
  """"bfloat16" where this CPU multiplies bf16 natively, else "float32".

  For CPU recipes (the shapes demo): bf16 compute is ~1.25x float32 per
  training step on a Zen 4 with avx512_bf16 and 4-5x on AMX, but emulated
  (far slower) on CPUs without those instructions, e.g. AMD Zen 3.
  """
  return "bfloat16" if cpu_bf16_flags(cpuinfo) else "float32"


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
