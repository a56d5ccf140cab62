"""What a training task hands the loop (`muse_jax.training.loop`).

A task names its trainable parts, each a module constructor, an optimizer
and a filter of the parameters it trains (`Part`); its frozen parts
(modules that are inputs of the step, e.g. a trained tokenizer or a
perceptual network: the loop passes their state to the compiled step as
arguments, so they are never baked into the program as constants); and a
pure step. Inside the step each part is a `Trainable`: its module and
optimizer, merged from the state the loop carries, with `minimize` to take
one optimizer step on a loss.

So one task covers one model and one optimizer (the masked transformer),
two modules with two optimizers (a VQGAN generator and its discriminator:
two `minimize` calls in one step), or a subset of one module's parameters
(decoder fine-tuning: `wrt=nnx.All(nnx.Param, nnx.PathContains("decoder"))`),
without touching the loop.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from flax import nnx
import jax
import optax

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Part:
  """A trained part: how to build it, its optimizer, what it trains."""

  make: Callable[[], nnx.Module]
  optimizer: optax.GradientTransformation
  wrt: Any = nnx.Param


class Trainable:
  """One part inside a step: its module, optimizer and trained filter."""

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, wrt: Any):
    self.model = model
    self.optimizer = optimizer
    self.wrt = wrt
    self.grad_norm = None

  def minimize(self, loss_fn: Callable[..., tuple[jax.Array, Metrics]],
               *args: Any) -> tuple[jax.Array, Metrics]:
    """One optimizer step on `loss_fn(model, *args) -> (loss, metrics)`.

    Gradients flow to the parameters `wrt` selects only; the loss may use
    the other parts' modules (passed in `args`) without training them.
    """
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, self.wrt),
                                 has_aux=True)
    (loss, metrics), grads = grad_fn(self.model, *args)
    self.optimizer.update(self.model, grads)
    self.grad_norm = optax.global_norm(grads)
    return loss, metrics


class Task(abc.ABC):
  """A training objective: its parts, frozen inputs and pure step."""

  @abc.abstractmethod
  def parts(self) -> dict[str, Part]:
    """The trained parts by name (checkpoint item names)."""

  def frozen(self) -> dict[str, nnx.Module]:
    """Modules the step reads but never trains (placed by the caller)."""
    return {}

  def phase(self, step: int) -> int:
    """Which compiled step runs at `step` (a static int; the loop compiles
    one program per phase it meets). One phase by default; a task whose
    step changes shape at some point (an adversarial loss that starts at
    step N) returns a new phase from there instead of branching at run
    time, which XLA:CPU runs far slower."""
    del step
    return 0

  def step_for_phase(self, phase: int) -> Callable[..., Metrics]:
    """The step function of `phase` (default: `step`)."""
    del phase
    return self.step

  @abc.abstractmethod
  def step(self, parts: dict[str, Trainable],
           frozen: dict[str, nnx.Module], batch: Batch,
           rng: jax.Array) -> Metrics:
    """One training step: update `parts` in place; return scalar metrics.

    Pure apart from the parts' in-place updates: the loop jits it, and
    `rng` is the loop's key folded with the step number.
    """
