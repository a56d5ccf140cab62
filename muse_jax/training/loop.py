"""The one training loop every stage runs its task through.

The loop owns everything that is not the objective:

* state built shape-first and created sharded (`sharding.abstract_state`),
  one (module, optimizer) state per named part of the task;
* a pure jitted step, `(states, frozen, batch, step) -> (states, metrics)`,
  that donates the state, folds the step into the RNG, passes the task's
  frozen modules as arguments, and adds each part's parameter, update and
  gradient norms to the task's metrics;
* exact resume from the newest checkpoint (every part, optimizer state and
  the grain iterator's position), Orbax checkpoints on an interval, on
  preemption and at the end (`muse_jax.checkpointing`);
* progress lines on the console (process 0), metrics to JSON lines and
  TensorBoard (`training.writers`);
* a stop with a clear message on a non-finite metric, naming the last good
  checkpoint;
* periodic evaluation hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
import sys
import time
from typing import Any

from etils import epath
from flax import nnx
from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from muse_jax import checkpointing
from muse_jax import sharding
from muse_jax.training import task as task_lib
from muse_jax.training import writers as writers_lib

PREEMPTED_EXIT_CODE = 143


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf; the run stops instead of wasting compute."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate and checkpoint."""

  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  eval_every: int = 0  # 0: evaluation hooks run at the end only.
  seed: int = 0

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"loop.num_steps must be >= 1, got {self.num_steps}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"loop.{name} must be >= 1, got "
                         f"{getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class EvalHook:
  """`fn(step, models, frozen) -> scalars` every `LoopConfig.eval_every`
  steps and at the end.

  `models` are the parts' current modules by name. Scalars go to the
  metric writers; a returned "images" entry (a dict of uint8 arrays) goes
  to TensorBoard as images.
  """

  name: str
  fn: Callable[[int, dict[str, nnx.Module], dict[str, nnx.Module]],
               dict[str, Any]]


@dataclasses.dataclass
class State:
  """What the loop carries: per part, its graphdef, state and shardings."""

  graphdefs: dict[str, nnx.GraphDef]
  states: dict[str, nnx.State]
  shardings: dict[str, Any]


def _part_maker(part: task_lib.Part) -> Callable[[], tuple[Any, Any]]:
  def make():
    model = part.make()
    return model, nnx.Optimizer(model, part.optimizer, wrt=part.wrt)
  return make


def abstract_state(task: task_lib.Task, mesh: Mesh, rules: sharding.Rules
                   ) -> State:
  """Shapes and shardings of every part's (module, optimizer) state."""
  graphdefs, states, shardings = {}, {}, {}
  for name, part in task.parts().items():
    graphdefs[name], states[name], shardings[name] = sharding.abstract_state(
        _part_maker(part), mesh, rules)
  return State(graphdefs, states, shardings)


def create_state(task: task_lib.Task, mesh: Mesh, rules: sharding.Rules
                 ) -> State:
  """Every part's (module, optimizer) state, created sharded."""
  abstract = abstract_state(task, mesh, rules)
  states = {name: nnx.split(sharding.create_sharded(_part_maker(part), mesh,
                                                    rules))[1]
            for name, part in task.parts().items()}
  return dataclasses.replace(abstract, states=states)


def split_frozen(frozen: dict[str, nnx.Module]
                 ) -> tuple[dict[str, nnx.GraphDef], dict[str, nnx.State]]:
  pairs = {name: nnx.split(module) for name, module in frozen.items()}
  return ({n: p[0] for n, p in pairs.items()},
          {n: p[1] for n, p in pairs.items()})


def make_step(task: task_lib.Task, state: State,
              frozen_graphdefs: dict[str, nnx.GraphDef], seed: int):
  """The jitted pure step `(states, frozen, batch, step, phase) -> (states,
  metrics)`; `phase` (`Task.phase`) is static: one program per phase.

  `states` is donated; `frozen` (the frozen modules' states) is an argument
  like the batch, so a frozen network never becomes a program constant.
  """
  parts = task.parts()
  base_rng = jax.random.key(seed)
  sharding_leaves = {n: jax.tree.leaves(s) for n, s in state.shardings.items()}
  single = len(parts) == 1

  def step_fn(states, frozen_states, batch, step, phase=0):
    rng = jax.random.fold_in(base_rng, step)
    trainables, before = {}, {}
    for name, st in states.items():
      model, optimizer = nnx.merge(state.graphdefs[name], st)
      trainables[name] = task_lib.Trainable(model, optimizer, parts[name].wrt)
      before[name] = jax.tree.leaves(nnx.state(model, parts[name].wrt))
    frozen = {n: nnx.merge(frozen_graphdefs[n], s)
              for n, s in frozen_states.items()}
    metrics = dict(task.step_for_phase(phase)(trainables, frozen, batch, rng))
    new_states = {}
    for name, t in trainables.items():
      prefix = "" if single else f"{name}/"
      after = jax.tree.leaves(nnx.state(t.model, parts[name].wrt))
      metrics[prefix + "param_norm"] = optax.global_norm(after)
      metrics[prefix + "update_norm"] = optax.global_norm(
          [a - b for a, b in zip(after, before[name])])
      if t.grad_norm is not None:
        metrics[prefix + "grad_norm"] = t.grad_norm
      leaves, treedef = jax.tree.flatten(
          nnx.split((t.model, t.optimizer))[1])
      leaves = [jax.lax.with_sharding_constraint(x, s) for x, s in
                zip(leaves, sharding_leaves[name], strict=True)]
      new_states[name] = jax.tree.unflatten(treedef, leaves)
    return new_states, metrics

  return jax.jit(step_fn, donate_argnums=(0,),
                 static_argnames=("phase",))


class _Progress:
  """`[stage] step a/b loss .. | x steps/s | ETA` on process 0's console."""

  def __init__(self, stage: str, total: int):
    self.stage, self.total = stage, total
    self._t0, self._s0 = time.perf_counter(), 0

  def start(self, step: int) -> None:
    self._t0, self._s0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    elapsed = time.perf_counter() - self._t0
    return (step - self._s0) / elapsed if elapsed > 0 else float("nan")

  def line(self, step: int, metrics: dict[str, float]) -> str:
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    parts = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    return (f"[{self.stage}] step {step}/{self.total} {parts} | "
            f"{rate:.2f} steps/s | ETA {_fmt_seconds(eta)}")


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 60}m{s % 60:02d}s"


def say(message: str) -> None:
  """A progress line on the console of process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)


def train(
    task: task_lib.Task,
    *,
    stage: str,
    workdir: epath.PathLike,
    data: Any,
    loop: LoopConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    eval_hooks: Sequence[EvalHook] = (),
    meta: dict[str, Any] | None = None,
) -> tuple[dict[str, nnx.Module], dict[str, Any]]:
  """Trains (or resumes) `task`; returns its trained modules and a summary.

  `data` is a grain iterator of per-process numpy batch dicts (its state is
  checkpointed). Checkpoints go to `<workdir>/checkpoints`, metrics to
  `<workdir>/metrics.jsonl` and `<workdir>/tb`.
  """
  workdir = epath.Path(workdir)
  t_start = time.perf_counter()
  frozen_graphdefs, frozen_states = split_frozen(task.frozen())
  abstract = abstract_state(task, mesh, rules)
  names = tuple(abstract.states)
  ckpt = checkpointing.Checkpointer(
      workdir / "checkpoints", parts=names, keep=loop.keep_checkpoints,
      save_interval_steps=loop.checkpoint_every)
  start_step = ckpt.latest_step() or 0
  if start_step:
    restored, _ = ckpt.restore(
        {n: (s[0], s[1]) for n, s in abstract.states.items()}, start_step,
        data_iter=data)
    # Same tree structure as the step's output, so the step traces once.
    states = {n: jax.tree.unflatten(
        jax.tree.structure(abstract.states[n]),
        jax.tree.leaves(nnx.State({0: restored[n][0], 1: restored[n][1]})))
              for n in names}
    state = dataclasses.replace(abstract, states=states)
    say(f"[{stage}] resumed from step {start_step}")
  else:
    state = create_state(task, mesh, rules)

  step_fn = make_step(task, state, frozen_graphdefs, loop.seed)
  writer = writers_lib.create_default_writer(workdir)
  progress = _Progress(stage, loop.num_steps)
  meta = dict(meta or {}, stage=stage)
  last: dict[str, float] = {}
  compile_s = 0.0

  def save(step):
    ckpt.save(step, _pairs(state.states), data_iter=data, meta=meta)

  def run_hooks(step):
    models = {n: nnx.merge(state.graphdefs[n], state.states[n])[0]
              for n in names}
    frozen = {n: nnx.merge(frozen_graphdefs[n], s)
              for n, s in frozen_states.items()}
    for hook in eval_hooks:
      out = dict(hook.fn(step, models, frozen))
      images = out.pop("images", None)
      scalars = {f"{hook.name}/{k}": float(v) for k, v in out.items()}
      writer.write_scalars(step, scalars)
      if images:
        writer.write_images(step, {f"{hook.name}/{k}": v
                                   for k, v in images.items()})
      say(f"[{stage}] eval {hook.name} step {step}: " + " ".join(
          f"{k} {v:.4g}" for k, v in sorted(scalars.items())))

  try:
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
      step = start_step
      first = True
      progress.start(step)
      while step < loop.num_steps:
        batch = sharding.global_batch(next(data), mesh, rules)
        t0 = time.perf_counter()
        new_states, metrics = step_fn(state.states, frozen_states, batch,
                                      jnp.asarray(step, jnp.int32),
                                      phase=task.phase(step))
        state.states = new_states
        step += 1
        if first:
          jax.block_until_ready(metrics)
          compile_s = time.perf_counter() - t0
          first = False
          progress.start(step)
        if step % loop.log_every == 0 or step == loop.num_steps:
          host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not all(math.isfinite(v) for v in host.values()):
            raise NonFiniteLossError(
                f"[{stage}] non-finite metrics at step {step}: {host}. "
                f"Last good checkpoint: {ckpt.latest_step()} in "
                f"{ckpt.directory}. Lower the learning rate or check the "
                "data.")
          writer.write_scalars(step, dict(host,
                                          steps_per_s=progress.rate(step)))
          say(progress.line(step, host))
          last = host
        if (eval_hooks and loop.eval_every and step % loop.eval_every == 0
            and step != loop.num_steps):
          run_hooks(step)
        preempted = ckpt.preempted(step)
        if ckpt.maybe_save(step, _pairs(state.states), data_iter=data,
                           meta=meta) and preempted:
          say(f"[{stage}] preempted: saved step {step}, exiting.")
          sys.exit(PREEMPTED_EXIT_CODE)  # `finally` waits for the save.
      if ckpt.latest_step() != step:
        save(step)
      if eval_hooks:
        run_hooks(step)
  finally:
    ckpt.close()
    writer.close()
  models = {n: nnx.merge(state.graphdefs[n], state.states[n])[0]
            for n in names}
  summary = dict(final_metrics=last, steps=step, resumed_from=start_step,
                 compile_s=compile_s, wall_s=time.perf_counter() - t_start)
  return models, summary


def _pairs(states: dict[str, nnx.State]) -> dict[str, tuple[Any, Any]]:
  return {n: (s[0], s[1]) for n, s in states.items()}
