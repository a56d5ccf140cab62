"""Exponential moving average (EMA) of a model's parameters.

GAN-trained generators (here the VQGAN tokenizer's decoder) oscillate from
step to step; evaluating and exporting an EMA of their weights gives
smoother, usually better samples (StyleGAN, MaskGIT, MAGVIT all keep one).

The EMA is an ``nnx.State`` of float32 copies of the model's ``nnx.Param``
variables, re-typed as ``EmaParam``: not a ``Param``, so optimizers and
gradients (``wrt=nnx.Param``) never touch it, while every copy keeps its
parameter's metadata (logical axes), so it is sharded exactly like the
parameter it shadows. Float32 shadows matter when parameters are stored in
low precision: a bf16 average with decay 0.999 could not move at all.

Pure functions, all jittable:

* ``init(model_or_params)`` -> the EMA state;
* ``update(ema, model_or_params, decay, step=None)`` -> the new EMA state
  ``decay * ema + (1 - decay) * params``, with the optional warm-up
  ``decay_t = min(decay, (1 + step) / (10 + step))`` when ``step`` is given
  (early averages then follow the fast-moving weights instead of being
  dominated by the random initialization);
* ``apply(model, ema)`` -> a copy of ``model`` whose parameters are the EMA
  (cast back to each parameter's dtype); ``model`` is left unchanged.

Carrying it in the training loop: the loop (``training.loop``) carries, per
task part, the state of its module and optimizer, and checkpoints, shards
and donates all of it. So the EMA rides along as part of the part's module:
``Ema`` is a small module holding the EMA state, e.g.

    class TokenizerWithEma(nnx.Module):
      def __init__(self, cfg, rngs):
        self.model = vqgan.VQModel(cfg, rngs=rngs)
        self.ema = ema.Ema(self.model, decay=0.999)

as the part's ``make``, with the default ``wrt=nnx.Param`` (the EMA is not
trained), and in the task's step, after ``minimize``,

    part = parts["vq"]
    part.model.ema.update(part.model.model, step=part.optimizer.step[...])

updates it in place; evaluation uses ``part.model.ema.apply_to(
part.model.model)``. Resume is then exact with no change to the loop.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

Array = jax.Array


class EmaParam(nnx.Variable):
  """A float32 EMA shadow of an ``nnx.Param`` (not itself a ``Param``)."""


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _params(model_or_params: Any) -> nnx.State:
  if isinstance(model_or_params, nnx.Module):
    return nnx.state(model_or_params, nnx.Param)
  return model_or_params


def _flat(state: Any, what: str) -> tuple[list[Any], list[Any], Any]:
  pairs, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)
  paths = [p for p, _ in pairs]
  leaves = [v for _, v in pairs]
  if not all(_is_var(v) for v in leaves):
    raise TypeError(f'{what} must be a module or an nnx.State of Variables')
  return paths, leaves, treedef


def _pair(ema: Any, params: Any) -> tuple[list[Any], list[Any], Any]:
  """The EMA and parameter Variables, matched by path (ValueError if not)."""
  e_paths, e_vars, treedef = _flat(ema, 'ema')
  p_paths, p_vars, _ = _flat(_params(params), 'params')
  if e_paths != p_paths:
    missing = sorted(set(map(jax.tree_util.keystr, p_paths)) ^
                     set(map(jax.tree_util.keystr, e_paths)))
    raise ValueError('EMA and parameters differ in structure; paths in only '
                     f'one of them: {missing[:5]}')
  for path, e, p in zip(e_paths, e_vars, p_vars):
    if e.shape != p.shape:
      raise ValueError(f'EMA{jax.tree_util.keystr(path)} has shape {e.shape}, '
                       f'the parameter {p.shape}')
  return e_vars, p_vars, treedef


def init(model_or_params: Any) -> nnx.State:
  """A float32 ``EmaParam`` copy of a module's ``nnx.Param`` state (or of a
  given state of Variables), keeping each Variable's metadata."""
  paths, leaves, treedef = _flat(_params(model_or_params), 'params')
  del paths
  shadows = [EmaParam(jnp.asarray(v.get_value(), jnp.float32),
                      **v.get_metadata()) for v in leaves]
  return jax.tree.unflatten(treedef, shadows)


def decay_at(decay: float, step: Array | int | None = None) -> Array:
  """The effective decay: ``decay``, or with ``step`` the warm-up
  ``min(decay, (1 + step) / (10 + step))``; float32."""
  d = jnp.float32(decay)
  if step is None:
    return d
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum(d, (1.0 + s) / (10.0 + s))


def update(ema: nnx.State, model_or_params: Any, decay: float,
           step: Array | int | None = None) -> nnx.State:
  """The new EMA state ``d * ema + (1 - d) * params`` (float32), pure.

  ``d = decay_at(decay, step)``: pass ``step`` (e.g. the optimizer's step
  count) for the warm-up, leave it ``None`` for a constant decay.
  """
  d = decay_at(decay, step)
  e_vars, p_vars, treedef = _pair(ema, model_or_params)
  new = []
  for e, p in zip(e_vars, p_vars):
    value = d * e.get_value() + (1.0 - d) * jnp.asarray(
        jax.lax.stop_gradient(p.get_value()), jnp.float32)
    new.append(e.replace(value))
  return jax.tree.unflatten(treedef, new)


def apply(model: nnx.Module, ema: nnx.State) -> nnx.Module:
  """A copy of ``model`` with the EMA as its parameters (in their dtypes).

  Everything else (non-``Param`` state) is copied from ``model``, which is
  not modified.
  """
  copy = nnx.clone(model)
  params = nnx.state(copy, nnx.Param)
  e_vars, p_vars, treedef = _pair(ema, params)
  new = [p.replace(jnp.asarray(e.get_value(), p.get_value().dtype))
         for e, p in zip(e_vars, p_vars)]
  nnx.update(copy, jax.tree.unflatten(treedef, new))
  return copy


class Ema(nnx.Module):
  """The EMA state as a module attribute, so a task part can carry it.

  ``params`` is the ``init`` state; ``update`` advances it in place (inside
  the loop's jitted step), ``apply_to`` returns the EMA copy of a model.
  """

  def __init__(self, model: nnx.Module, decay: float = 0.999,
               warmup: bool = True):
    if not 0.0 <= decay < 1.0:
      raise ValueError(f'Ema.decay must be in [0, 1), got {decay!r}')
    self.decay = decay
    self.warmup = warmup
    self.params = nnx.data(init(model))

  def update(self, model: nnx.Module, step: Array | int | None = None
             ) -> None:
    """One EMA step toward ``model``'s parameters; ``step`` drives the
    warm-up (ignored when ``warmup`` is False)."""
    new = update(self.params, model, self.decay,
                 step if self.warmup else None)
    for var, value in zip(jax.tree.leaves(self.params, is_leaf=_is_var),
                          jax.tree.leaves(new, is_leaf=_is_var)):
      var.set_value(value.get_value())

  def apply_to(self, model: nnx.Module) -> nnx.Module:
    return apply(model, self.params)
