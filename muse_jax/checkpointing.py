"""The one module that talks to Orbax.

A checkpoint is a step directory holding, for every named part of a
training task (`muse_jax.training.task`), two items:
- `<part>.model`: the part's module state (pure nested dicts; never pickles),
  restored straight into the sharding of an abstract target; samplers and
  later stages read this item alone (`restore_model`);
- `<part>.optimizer`: its optimizer state;
and two more:
- `data_iter`: the grain iterator's state (grain's own Orbax handler, one
  file per process), so a resumed run sees exactly the batches an
  uninterrupted one would;
- `meta`: JSON facts about the run (stage, step).

Saves are asynchronous (`wait()` before reading them back or exiting);
`keep` newest checkpoints are kept. Saving is decided by Orbax's policies:
every `save_interval_steps`, and on preemption (Orbax's
`PreemptionCheckpointingPolicy`: all hosts agree on the step through JAX's
preemption sync service, which `jax.distributed` starts). A single process
without `jax.distributed` has no such service, so there a SIGTERM makes the
next `maybe_save` write a checkpoint whatever the interval.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import signal
import threading
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import grain
import jax
import orbax.checkpoint as ocp

PathLike = str | os.PathLike[str]

MODEL = "model"
OPTIMIZER = "optimizer"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, corrupt or does not match the model."""


def item_name(part: str, what: str) -> str:
  """The Orbax item of one part's `model` or `optimizer` state."""
  return f"{part}.{what}"


class Checkpointer:
  """Async, keep-N checkpoints of named parts, data iterator and metadata."""

  def __init__(
      self,
      directory: PathLike,
      *,
      parts: Sequence[str],
      keep: int = 3,
      save_interval_steps: int = 1000,
      async_save: bool = True,
      handle_sigterm: bool = True,
      read_only: bool = False,
  ):
    """`read_only`: open an existing directory (restores only)."""
    if not parts:
      raise ValueError("a checkpoint needs at least one part")
    self.directory = epath.Path(directory)
    self.parts = tuple(parts)
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(
            max(1, save_interval_steps)),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_decision_policy=policy,
        enable_async_checkpointing=async_save,
        create=not read_only,
    )
    names = [item_name(p, w) for p in self.parts for w in (MODEL, OPTIMIZER)]
    handlers = {n: ocp.StandardCheckpointHandler() for n in names}
    handlers["data_iter"] = grain.checkpoint.CheckpointHandler()
    handlers["meta"] = ocp.JsonCheckpointHandler()
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_handlers=handlers)
    except OSError as e:
      raise CheckpointError(
          f"cannot create checkpoint directory {self.directory}: {e}") from e
    self._sigterm = threading.Event()
    self._previous_handler = None
    if (handle_sigterm and not read_only
        and threading.current_thread() is threading.main_thread()):
      previous = signal.getsignal(signal.SIGTERM)

      def on_sigterm(signum, frame):
        logging.warning("SIGTERM: checkpointing at the next step.")
        self._sigterm.set()
        if callable(previous):
          previous(signum, frame)

      self._previous_handler = previous
      signal.signal(signal.SIGTERM, on_sigterm)

  def preempted(self, step: int) -> bool:
    """Whether a preemption asks for a checkpoint at `step`."""
    return self._sigterm.is_set() or self._manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, states: dict[str, tuple[Any, Any]], *,
           data_iter: Any = None, meta: dict[str, Any] | None = None) -> None:
    """Writes a checkpoint now (asynchronously).

    `states` maps every part to its (model, optimizer) nnx.State (or module
    and nnx.Optimizer); an optimizer given as None is not written (an
    imported model: `restore_model` reads it, training cannot resume it).
    """
    self._check_parts(states, exact=True)
    items = {}
    for part, (model, opt) in states.items():
      items[item_name(part, MODEL)] = ocp.args.StandardSave(
          nnx.to_pure_dict(_state(model)))
      if opt is not None:
        items[item_name(part, OPTIMIZER)] = ocp.args.StandardSave(
            nnx.to_pure_dict(_state(opt)))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    items["meta"] = ocp.args.JsonSave(dict(meta or {}, step=int(step)))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def maybe_save(self, step: int, states: dict[str, tuple[Any, Any]],
                 **kwargs) -> bool:
    """Saves on the interval, or at once after a preemption signal."""
    if self._sigterm.is_set() or self._manager.should_save(step):
      self.save(step, states, **kwargs)
      return True
    return False

  def restore(
      self, abstract: dict[str, tuple[Any, Any | None]],
      step: int | None = None, *, data_iter: Any = None,
  ) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """Restores ({part: (model, optimizer)} states, meta).

    `abstract` maps parts to (model, optimizer) nnx.State trees of
    jax.ShapeDtypeStruct (with shardings) or arrays, e.g. from
    `sharding.abstract_state`; an optimizer given as None is not read.
    `data_iter`, when given, is set to the saved position in place.
    """
    self._check_parts(abstract, exact=False)
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    targets = {}
    for part, trees in abstract.items():
      for what, tree in zip((MODEL, OPTIMIZER), trees):
        if tree is not None:
          targets[item_name(part, what)] = ocp.args.StandardRestore(
              jax.tree.map(_as_abstract, nnx.to_pure_dict(_state(tree))))
    if data_iter is not None:
      targets["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    targets["meta"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**targets))
    except Exception as e:  # Orbax raises many types; name the culprit.
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {e}") from e
    states = {}
    for part, trees in abstract.items():
      out = []
      for what, tree in zip((MODEL, OPTIMIZER), trees):
        if tree is None:
          out.append(None)
          continue
        state = jax.tree.map(lambda x: x, _state(tree))
        try:
          nnx.replace_by_pure_dict(state, restored[item_name(part, what)])
        except Exception as e:
          raise CheckpointError(
              f"checkpoint step {step} in {self.directory}: item "
              f"{item_name(part, what)!r} does not match the model: {e}"
          ) from e
        out.append(state)
      states[part] = tuple(out)
    return states, dict(restored["meta"] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager (idempotent)."""
    if self._manager is None:
      return
    self._manager.wait_until_finished()
    self._manager.close()
    self._manager = None
    if self._previous_handler is not None:
      # Outside training, SIGTERM gets its usual meaning back.
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _check_parts(self, states: dict[str, Any], exact: bool) -> None:
    unknown = sorted(set(states) - set(self.parts))
    missing = sorted(set(self.parts) - set(states)) if exact else []
    if unknown or missing:
      raise ValueError(f"checkpoint parts {self.parts}: unknown {unknown}, "
                       f"missing {missing}")


def _state(x: Any) -> nnx.State:
  return x if isinstance(x, nnx.State) else nnx.state(x)


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype,
                              sharding=getattr(x, "sharding", None))


def restore_model(directory: PathLike, model: nnx.Module, part: str,
                  step: int | None = None) -> nnx.Module:
  """Loads one part's `model` item of a trainer checkpoint into `model`.

  Used by samplers, evaluators and later stages: the optimizer state is not
  read. `model` may be abstract (`nnx.eval_shape`, with shardings); it is
  filled in place.
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  ckpt = Checkpointer(directory, parts=(part,), async_save=False,
                      handle_sigterm=False, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise CheckpointError(f"no checkpoint found in {ckpt.directory}")
    states, _ = ckpt.restore({part: (nnx.state(model), None)}, step)
  finally:
    ckpt.close()
  nnx.update(model, states[part][0])
  return model
