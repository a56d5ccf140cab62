"""The one module that talks to Orbax.

A checkpoint is a step directory holding four items:
- `model` and `optimizer`: their arrays (pure nested dicts; never pickles),
  restored straight into the sharding of an abstract target; a sampler reads
  `model` alone;
- `data_iter`: the input iterator's JSON state, so a resumed run sees exactly
  the batches an uninterrupted one would;
- `meta`: JSON facts about the run (stage, config digest, step).

Saves are asynchronous (`wait()` before reading them back or exiting);
`keep` newest checkpoints are kept; a SIGTERM (preemption on Cloud TPU/SLURM)
makes the next `maybe_save` write a checkpoint whatever the interval.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from absl import logging
from flax import nnx
import jax
import orbax.checkpoint as ocp


STATE_ITEMS = ("model", "optimizer")


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the model."""


class Checkpointer:
  """Async, keep-N checkpoints of (train state, data iterator, metadata)."""

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      keep: int = 3,
      save_interval_steps: int = 1000,
      async_save: bool = True,
      handle_sigterm: bool = True,
  ):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_names=STATE_ITEMS + ("data_iter", "meta"))
    except OSError as e:
      raise CheckpointError(
          f"cannot create checkpoint directory {self.directory}: {e}") from e
    self._preempted = threading.Event()
    self._previous_handler = None
    if handle_sigterm and threading.current_thread() is threading.main_thread():
      previous = signal.getsignal(signal.SIGTERM)

      def on_sigterm(signum, frame):
        logging.warning("SIGTERM: checkpointing at the next step.")
        self._preempted.set()
        if callable(previous):
          previous(signum, frame)

      self._previous_handler = previous
      signal.signal(signal.SIGTERM, on_sigterm)

  @property
  def preempted(self) -> bool:
    return self._preempted.is_set()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, states: dict[str, nnx.State], *,
           data_iter: dict[str, Any] | None = None,
           meta: dict[str, Any] | None = None) -> None:
    """Writes a checkpoint now (asynchronously).

    `states` maps item names in STATE_ITEMS to nnx.State (or module) trees.
    """
    _check_items(states)
    items = {k: ocp.args.StandardSave(nnx.to_pure_dict(_state(v)))
             for k, v in states.items()}
    self._manager.save(
        step,
        args=ocp.args.Composite(
            data_iter=ocp.args.JsonSave(data_iter or {}),
            meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))),
            **items,
        ),
        force=True,
    )

  def maybe_save(self, step: int, states: dict[str, nnx.State], **kwargs
                 ) -> bool:
    """Saves on the interval, or at once after a preemption signal."""
    if self.preempted or self._manager.should_save(step):
      self.save(step, states, **kwargs)
      return True
    return False

  def restore(
      self, abstract: dict[str, nnx.State], step: int | None = None
  ) -> tuple[dict[str, nnx.State], dict[str, Any], dict[str, Any]]:
    """Restores (states, data_iter, meta), placing arrays like the targets.

    `abstract` maps the wanted items of STATE_ITEMS to nnx.State trees of
    jax.ShapeDtypeStruct (with shardings) or arrays, e.g. from
    `sharding.abstract_state`; items not named are not read.
    """
    _check_items(abstract)
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    targets = {
        k: ocp.args.StandardRestore(
            jax.tree.map(_as_abstract, nnx.to_pure_dict(_state(v))))
        for k, v in abstract.items()}
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              data_iter=ocp.args.JsonRestore(),
              meta=ocp.args.JsonRestore(),
              **targets,
          ),
      )
    except Exception as e:  # Orbax raises many types; name the culprit.
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {e}") from e
    states = {}
    for k, v in abstract.items():
      state = jax.tree.map(lambda x: x, _state(v))
      try:
        nnx.replace_by_pure_dict(state, restored[k])
      except Exception as e:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory}: item {k!r} does "
            f"not match the model: {e}") from e
      states[k] = state
    return states, dict(restored["data_iter"] or {}), dict(
        restored["meta"] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._previous_handler is not None:
      # Outside training, SIGTERM gets its usual meaning back.
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def _check_items(states: dict[str, Any]) -> None:
  unknown = sorted(set(states) - set(STATE_ITEMS))
  if unknown:
    raise ValueError(f"unknown checkpoint items {unknown}; "
                     f"expected some of {STATE_ITEMS}")


def _state(x: Any) -> nnx.State:
  return x if isinstance(x, nnx.State) else nnx.state(x)


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype,
                              sharding=getattr(x, "sharding", None))


def restore_model(directory: str | os.PathLike[str], model: nnx.Module,
                  step: int | None = None) -> nnx.Module:
  """Loads a trainer checkpoint's `model` item into `model` (in place).

  Used by samplers and evaluators: the optimizer state is not read.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  ckpt = Checkpointer(directory, async_save=False, handle_sigterm=False)
  try:
    if ckpt.latest_step() is None:
      raise CheckpointError(f"no checkpoint found in {ckpt.directory}")
    states, _, _ = ckpt.restore({"model": nnx.state(model)}, step)
  finally:
    ckpt.close()
  nnx.update(model, states["model"])
  return model
