"""The training-loop skeleton every stage shares.

A stage supplies a model constructor, an optimizer and a pure loss
`loss_fn(model, batch, rng) -> (loss, metrics)`; this module builds the
sharded train state shape-first, jits a pure step that donates the state and
folds the step number into the RNG, resumes from the newest checkpoint
(including the data iterator), logs progress (stage, step, loss, steps/s,
ETA), stops on a non-finite loss with a clear message, and checkpoints on an
interval, on preemption and at the end.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from muse_jax import checkpointing
from muse_jax import sharding

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf; the run stops instead of wasting compute."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""

  learning_rate: float = 1e-4
  warmup_steps: int = 0
  end_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.96
  weight_decay: float = 0.045
  grad_clip_norm: float = 1.0

  def make(self, total_steps: int) -> optax.GradientTransformation:
    warmup = min(self.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else self.learning_rate,
        peak_value=self.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=self.learning_rate * self.end_lr_fraction,
    )
    parts = []
    if self.grad_clip_norm:
      parts.append(optax.clip_by_global_norm(self.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=self.b1, b2=self.b2,
                             weight_decay=self.weight_decay))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log and checkpoint."""

  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  seed: int = 0


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, seed: int,
                    state_shardings: Any):
  """A jitted pure step: (state, batch, step) -> (state, metrics)."""
  base_rng = jax.random.key(seed)
  # Leaves in flatten order; the state keeps exactly these shardings.
  state_sharding_leaves = jax.tree.leaves(state_shardings)

  def step_fn(state, batch, step):
    model, optimizer = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(base_rng, step)

    def objective(m):
      return loss_fn(m, batch, rng)

    (loss, metrics), grads = nnx.value_and_grad(objective, has_aux=True)(
        model)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    new_params = jax.tree.leaves(nnx.state(model, nnx.Param))
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(new_params)
    metrics["update_norm"] = optax.global_norm(
        [new - old for new, old in zip(new_params, params)])
    leaves, treedef = jax.tree.flatten(nnx.split((model, optimizer))[1])
    leaves = [jax.lax.with_sharding_constraint(x, s)
              for x, s in zip(leaves, state_sharding_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves), metrics

  # Batches arrive as global arrays already sharded (sharding.global_batch).
  return jax.jit(step_fn, donate_argnums=(0,))


class ProgressLog:
  """Prints `[stage] step a/b loss .. | x steps/s | ETA` and a JSONL file."""

  def __init__(self, stage: str, total_steps: int, path: str | None):
    self.stage = stage
    self.total = total_steps
    self.path = path
    self._t0 = None
    self._s0 = 0

  def start(self, step: int) -> None:
    self._t0, self._s0 = time.perf_counter(), step

  def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    elapsed = time.perf_counter() - self._t0
    rate = (step - self._s0) / elapsed if elapsed > 0 else float("nan")
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    parts = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    print(f"[{self.stage}] step {step}/{self.total} {parts} | "
          f"{rate:.2f} steps/s | ETA {_fmt_seconds(eta)}", flush=True)
    record = dict(metrics, step=step, steps_per_s=rate)
    if self.path and jax.process_index() == 0:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 60}m{s % 60:02d}s"


def train(
    *,
    stage: str,
    workdir: str,
    make_model: Callable[[], nnx.Module],
    optimizer: OptimizerConfig,
    loss_fn: LossFn,
    data: Any,
    loop: LoopConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    meta: dict[str, Any] | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
  """Trains (or resumes) one stage; returns the model and a summary.

  `data` is an iterator of numpy batch dicts with `get_state()/set_state()`
  (see `muse_jax.data.pipeline`); its state is checkpointed with the model.
  """
  tx = optimizer.make(loop.num_steps)

  def make_state():
    model = make_model()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  t_start = time.perf_counter()
  graphdef, abstract, shardings = sharding.abstract_state(
      make_state, mesh, rules)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=loop.keep_checkpoints,
      save_interval_steps=loop.checkpoint_every)
  start_step = ckpt.latest_step() or 0
  if start_step:
    restored, data_state, _ = ckpt.restore(
        {"model": abstract[0], "optimizer": abstract[1]}, start_step)
    # Same tree structure as the step's output, so the step traces once.
    state = jax.tree.unflatten(
        jax.tree.structure(abstract),
        jax.tree.leaves(nnx.State(
            {0: restored["model"], 1: restored["optimizer"]})))
    if data_state:
      data.set_state(data_state)
    print(f"[{stage}] resumed from step {start_step}", flush=True)
  else:
    state = nnx.split(sharding.create_sharded(make_state, mesh, rules))[1]

  step_fn = make_train_step(graphdef, loss_fn, loop.seed, shardings)
  progress = ProgressLog(stage, loop.num_steps,
                         os.path.join(workdir, "metrics.jsonl"))
  meta = dict(meta or {}, stage=stage)
  last = {}
  compile_s = 0.0
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    step = start_step
    first = True
    progress.start(step)
    while step < loop.num_steps:
      batch = sharding.global_batch(next(data), mesh, rules)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
      step += 1
      if first:
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        first = False
        progress.start(step)
      if step % loop.log_every == 0 or step == loop.num_steps:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in host.values()):
          ckpt.close()
          raise NonFiniteLossError(
              f"[{stage}] non-finite metrics at step {step}: {host}. "
              f"Last good checkpoint: {ckpt.latest_step()} in "
              f"{ckpt.directory}. Lower the learning rate or check the data.")
        last = progress.log(step, host)
      saved = ckpt.maybe_save(
          step, _split_states(state), data_iter=data.get_state(),
          meta=meta)
      if saved and ckpt.preempted:
        ckpt.close()
        print(f"[{stage}] preempted: saved step {step}, exiting.", flush=True)
        sys.exit(143)
    if ckpt.latest_step() != step:
      ckpt.save(step, _split_states(state),
                data_iter=data.get_state(), meta=meta)
  ckpt.close()
  model, _ = nnx.merge(graphdef, state)
  summary = dict(
      final_metrics=last, steps=step, resumed_from=start_step,
      compile_s=compile_s, wall_s=time.perf_counter() - t_start)
  return model, summary


def _split_states(state: nnx.State) -> dict[str, nnx.State]:
  return {"model": state[0], "optimizer": state[1]}
