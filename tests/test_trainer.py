"""Tests of the shared training loop (muse_jax.trainers.common) with the
masked-transformer objective (muse_jax.trainers.transformer)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading

from flax import nnx
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import checkpointing
from muse_jax import sharding
from muse_jax.models import transformer as tr
from muse_jax.trainers import common
from muse_jax.trainers import transformer as tt

CFG = tr.TransformerConfig(codebook_size=16, grid_size=4, text_dim=8,
                           width=16, depth=2, num_heads=2, mlp_dim=32)
BATCH = 8  # Divisible by the 8-way data axis.
TEXT_LEN = 3
NUM_STEPS = 24
# Warmup then cosine decay over NUM_STEPS: resuming must restore the
# optimizer's step count, or the learning rate (and the result) differs.
OPT = common.OptimizerConfig(learning_rate=1e-2, warmup_steps=2)
POISON = 1e4

_base_loss = tt.make_loss_fn(tt.ObjectiveConfig())
TRACES = []  # One entry per trace of the train step (Python runs only then).


def loss_fn(model, batch, rng):
  """Muse's loss, but NaN for a batch whose text embeddings are poisoned.

  Every run uses this one function, so all runs share one compiled step
  (see `_compilation_cache`); on clean batches it is exactly Muse's loss.
  """
  TRACES.append(1)
  loss, metrics = _base_loss(model, batch, rng)
  poisoned = jnp.max(jnp.abs(batch["text_emb"])) >= POISON
  return jnp.where(poisoned, jnp.nan, loss), metrics


class ToyData:
  """Deterministic in-memory batches; batch i depends only on (seed, i).

  Every image is the same two-token pattern (trivially learnable); the text
  embeddings differ per batch, so replaying the wrong batches changes the
  trained parameters. `sigterm_at`/`poison_at` act when serving that batch.
  """

  def __init__(self, seed=0, sigterm_at=None, poison_at=None):
    self.seed = seed
    self.sigterm_at = sigterm_at
    self.poison_at = poison_at
    self.position = 0
    self.served = []

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position])
    tokens = np.tile(np.arange(CFG.seq_len) % 2, (BATCH, 1))
    batch = {
        "tokens": tokens.astype(np.int32),
        "text_emb": rng.normal(size=(BATCH, TEXT_LEN, CFG.text_dim)).astype(
            np.float32),
        "text_mask": np.ones((BATCH, TEXT_LEN), bool),
    }
    if self.position == self.poison_at:
      batch["text_emb"][0, 0, 0] = POISON
    if self.position == self.sigterm_at:
      # Only with a Python handler (the Checkpointer's) installed: the
      # default action would kill the test process.
      if not callable(signal.getsignal(signal.SIGTERM)):
        raise RuntimeError("no SIGTERM handler installed")
      os.kill(os.getpid(), signal.SIGTERM)
    self.served.append(self.position)
    self.position += 1
    return batch

  def get_state(self):
    return {"position": self.position, "seed": self.seed}

  def set_state(self, state):
    assert state["seed"] == self.seed
    self.position = int(state["position"])


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])


@pytest.fixture(scope="module")
def rules(mesh):
  return sharding.validate_rules(sharding.DEFAULT_RULES, mesh)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module only.

  Every `train` call jits a new state constructor and step function; with the
  cache, runs with the same model and loss compile once (~15 s of CPU each
  otherwise). Restored afterwards so other modules are unaffected.
  """
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  previous = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir",
                    str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  compilation_cache.reset_cache()
  yield
  for n, v in previous.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def _restore_sigterm_handler():
  # Every Checkpointer installs a SIGTERM handler; do not leak them.
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("train() handles SIGTERM only in the main thread")
  previous = signal.getsignal(signal.SIGTERM)
  yield
  signal.signal(signal.SIGTERM, previous)


def _make_model():
  return tr.MaskedTransformer(CFG, rngs=nnx.Rngs(0))


def _train(workdir, data, mesh, rules, *, checkpoint_every):
  # Few checkpoints: each Orbax save of the 8-device state takes ~1 s here.
  loop = common.LoopConfig(num_steps=NUM_STEPS, log_every=1,
                           checkpoint_every=checkpoint_every,
                           keep_checkpoints=5, seed=0)
  return common.train(
      stage="toy", workdir=str(workdir), make_model=_make_model,
      optimizer=OPT, loss_fn=loss_fn, data=data, loop=loop, mesh=mesh,
      rules=rules, meta={"run": "test"})


def _params(model):
  return jax.tree.map(np.asarray,
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _steps(workdir):
  ckdir = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mesh, rules):
  workdir = tmp_path_factory.mktemp("straight")
  data = ToyData()
  TRACES.clear()
  model, summary = _train(workdir, data, mesh, rules,
                          checkpoint_every=NUM_STEPS // 2)
  summary["traces"] = len(TRACES)
  return workdir, data, model, summary


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, mesh, rules):
  """The same run, preempted (SIGTERM) during step 3: its last checkpoint."""
  workdir = tmp_path_factory.mktemp("preempted")
  data = ToyData(sigterm_at=2)
  previous = signal.getsignal(signal.SIGTERM)
  # The Checkpointer chains to the previous handler: make that a no-op.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  try:
    with pytest.raises(SystemExit) as exc:
      _train(workdir, data, mesh, rules, checkpoint_every=100)
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert exc.value.code == 143
  assert data.served == [0, 1, 2]
  # Saved at once although off the 100-step interval (Orbax also saves the
  # first step it is offered).
  assert _steps(workdir)[-1] == 3
  return workdir


# ---------------------------------------------------------------------------
# A plain run.
# ---------------------------------------------------------------------------


def test_train_runs_logs_and_checkpoints(straight_run, mesh, rules):
  workdir, data, model, summary = straight_run
  assert summary["steps"] == NUM_STEPS and summary["resumed_from"] == 0
  metrics = summary["final_metrics"]
  for key in ("loss", "masked_accuracy", "grad_norm", "param_norm",
              "update_norm", "mask_rate"):
    assert key in metrics, metrics
    assert math.isfinite(metrics[key]), (key, metrics)
  assert metrics["step"] == NUM_STEPS
  assert 0.0 <= metrics["masked_accuracy"] <= 1.0
  assert 0.0 < metrics["mask_rate"] <= 1.0
  assert metrics["grad_norm"] > 0 and metrics["update_norm"] > 0
  assert metrics["param_norm"] > 0
  # One JSONL record per logged step.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  # Checkpoints on the interval (Orbax also saves the first step).
  assert set(_steps(workdir)) - {1} == {NUM_STEPS // 2, NUM_STEPS}
  assert data.served == list(range(NUM_STEPS))
  # Parameters keep their (data-parallel: replicated) shardings.
  for x in jax.tree.leaves(nnx.state(model)):
    assert x.sharding.mesh.shape == mesh.shape
    assert x.sharding.is_fully_replicated
  # The final checkpoint holds the returned model, the iterator and meta.
  _, abstract, _ = sharding.abstract_state(_make_model, mesh, rules)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), handle_sigterm=False)
  states, data_iter, meta = ckpt.restore({"model": abstract})
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(states["model"]), _params(model))
  assert data_iter == {"position": NUM_STEPS, "seed": 0}
  assert meta == {"run": "test", "stage": "toy", "step": NUM_STEPS}


def test_loss_decreases_on_learnable_task(straight_run):
  workdir, _, _, _ = straight_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  first = np.mean([r["loss"] for r in records[:3]])
  last = np.mean([r["loss"] for r in records[-3:]])
  assert last < 0.5 * first, (first, last)
  assert records[-1]["masked_accuracy"] > 0.9, records[-1]


@pytest.fixture(scope="module")
def resumed_run(preempted_run, tmp_path_factory, mesh, rules):
  """A second call on the preempted run's directory, with a fresh iterator."""
  workdir = tmp_path_factory.mktemp("resumed") / "run"
  shutil.copytree(preempted_run, workdir)
  data = ToyData()
  TRACES.clear()
  model, summary = _train(workdir, data, mesh, rules, checkpoint_every=100)
  summary["traces"] = len(TRACES)
  return workdir, data, model, summary


def test_exact_resume(straight_run, resumed_run, mesh, rules):
  _, _, straight_model, _ = straight_run
  workdir, data, model, summary = resumed_run
  # Resumed at step 3 and at batch 3; ends where the straight run did.
  assert summary["resumed_from"] == 3 and summary["steps"] == NUM_STEPS
  assert data.served == list(range(3, NUM_STEPS))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-6),
               _params(model), _params(straight_model))
  # A third call has nothing left to do and returns the same model.
  data = ToyData()
  again, summary = _train(workdir, data, mesh, rules, checkpoint_every=100)
  assert summary["resumed_from"] == NUM_STEPS and data.served == []
  jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))


def test_fresh_run_traces_step_once(straight_run):
  assert straight_run[3]["traces"] == 1


def test_resumed_run_traces_step_once(resumed_run):
  assert resumed_run[3]["traces"] == 1


def test_non_finite_loss_raises(preempted_run, tmp_path, mesh, rules):
  workdir = tmp_path / "run"
  shutil.copytree(preempted_run, workdir)
  data = ToyData(poison_at=4)  # The batch of step 5.
  with pytest.raises(common.NonFiniteLossError) as exc:
    _train(workdir, data, mesh, rules, checkpoint_every=100)
  msg = str(exc.value)
  # Names the stage, the step and the last good checkpoint.
  assert re.search(r"\[toy\] non-finite metrics at step 5\b", msg), msg
  assert "'loss': nan" in msg
  assert "Last good checkpoint: 3" in msg
  assert os.path.join(str(workdir), "checkpoints") in msg
  assert data.served == [3, 4]
  assert _steps(workdir)[-1] == 3  # Nothing saved past the failure.
