"""Benchmark configurations, shared by our runner and the peers' runner.

Pure Python (no JAX, no torch), so both virtual environments import it.
`S` is the issue's benchmark config S; `S-bf16` the same model computing in
bfloat16 (float32 parameters, accumulation, norms, softmax and loss; the
peers under `torch.autocast`); `demo` is the shapes demo's
transformer (configs/shapes_demo.py); `tiny` is a smoke-test size for
developing the harness, not a benchmark.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One matched model size plus the batch and sampling settings."""

  name: str
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  grid_size: int  # image tokens per side.
  text_len: int
  text_dim: int
  codebook_size: int
  batch: int
  sample_steps: int
  guidance_scale: float = 3.0
  dtype: str = "float32"  # compute dtype ("float32" or "bfloat16").
  # Our model's implementation: the XLA:CPU path ("xla_cpu") on the CPU
  # benchmarks; "plain" is the default path TPU/GPU users run.
  impl: str = "xla_cpu"

  @property
  def seq_len(self) -> int:
    return self.grid_size**2

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def describe(self) -> dict:
    return dataclasses.asdict(self)


CONFIGS = {
    "S": BenchConfig(
        name="S", width=512, depth=8, num_heads=8, mlp_dim=2048,
        grid_size=16, text_len=32, text_dim=384, codebook_size=8192,
        batch=8, sample_steps=12),
    "S-bf16": BenchConfig(
        name="S-bf16", width=512, depth=8, num_heads=8, mlp_dim=2048,
        grid_size=16, text_len=32, text_dim=384, codebook_size=8192,
        batch=8, sample_steps=12, dtype="bfloat16"),
    "demo": BenchConfig(
        name="demo", width=128, depth=4, num_heads=4, mlp_dim=512,
        grid_size=8, text_len=24, text_dim=384, codebook_size=512,
        batch=16, sample_steps=16),
    "tiny": BenchConfig(
        name="tiny", width=64, depth=2, num_heads=2, mlp_dim=256,
        grid_size=4, text_len=8, text_dim=32, codebook_size=64,
        batch=2, sample_steps=4),
}


def get(name: str) -> BenchConfig:
  if name not in CONFIGS:
    raise ValueError(f"unknown benchmark config {name!r}; "
                     f"expected one of {sorted(CONFIGS)}")
  return CONFIGS[name]


def runnable(names: list[str], bf16_ok: bool, evidence: str
             ) -> tuple[list[str], list[dict[str, Any]]]:
  """(configs to run, `what: skip` records of the bf16 ones without bf16)."""
  run, skipped = [], []
  for name in names:
    if get(name).dtype == "bfloat16" and not bf16_ok:
      skipped.append(dict(what="skip", impl="bench", config=name,
                          reason=f"no native bf16 on this machine "
                                 f"({evidence})"))
    else:
      run.append(name)
  return run, skipped
