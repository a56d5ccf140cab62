"""The optimizer recipe every task's parts use: AdamW, warmup, cosine decay.

Weight decay applies to the matmul and convolution kernels only (parameters
named `kernel`): norms, biases, embedding tables (tokens, positions) and the
VQ codebook are not decayed, as in most transformer recipes (decaying a
LayerNorm scale or a position table toward zero fights what it encodes).
`decay="all"` decays every parameter, for comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

DECAY = ("kernels", "all")


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_kernel(path: tuple[Any, ...]) -> bool:
  """Whether a parameter's tree path names a `kernel`."""
  names = [_key_name(e) for e in path]
  # nnx.State paths may end in the Variable's own `value` entry.
  return "kernel" in names[-2:]


def kernel_mask(params: Any) -> Any:
  """A pytree of bools over `params`: True at kernels."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_kernel(p), params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  end_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.96
  weight_decay: float = 0.045
  decay: str = "kernels"
  grad_clip_norm: float = 1.0

  def __post_init__(self):
    if self.decay not in DECAY:
      raise ValueError(f"optimizer.decay={self.decay!r} not in {DECAY}")
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be > 0, got "
                       f"{self.learning_rate}")
    for name in ("warmup_steps", "weight_decay", "grad_clip_norm"):
      if getattr(self, name) < 0:
        raise ValueError(f"optimizer.{name} must be >= 0, got "
                         f"{getattr(self, name)}")

  def schedule(self, total_steps: int) -> optax.Schedule:
    warmup = min(self.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else self.learning_rate,
        peak_value=self.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=self.learning_rate * self.end_lr_fraction,
    )

  def make(self, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if self.grad_clip_norm:
      parts.append(optax.clip_by_global_norm(self.grad_clip_norm))
    parts.append(optax.adamw(
        self.schedule(total_steps), b1=self.b1, b2=self.b2,
        weight_decay=self.weight_decay,
        mask=kernel_mask if self.decay == "kernels" else None))
    return optax.chain(*parts)
