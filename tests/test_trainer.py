"""Tests of the one training loop (muse_jax.training.loop) with the
masked-transformer task (muse_jax.tasks.masked_transformer), a two-part
adversarial task with a frozen module (tests/two_part_task.py), and the
optimizer recipe (muse_jax.training.optimizer)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading

from flax import nnx
from flax.core import spmd as flax_spmd
import grain
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from muse_jax import checkpointing
from muse_jax import sharding
from muse_jax.models import transformer as tr
from muse_jax.tasks import masked_transformer as mt
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib
import two_part_task as tp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tr.TransformerConfig(codebook_size=16, grid_size=4, text_dim=8,
                           width=16, depth=2, num_heads=2, mlp_dim=32)
BATCH = 8  # Divisible by the 8-way data axis.
TEXT_LEN = 3
NUM_STEPS = 24
# Warmup then cosine decay over NUM_STEPS: resuming must restore the
# optimizer's step count, or the learning rate (and the result) differs.
OPT = optimizer_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=2)
POISON = 1e4
PART = mt.PART

TRACES = []  # One entry per trace of the train step (Python runs only then).


class ToyTask(mt.MaskedTransformerTask):
  """Muse's objective, but a NaN loss for a batch whose text embeddings are
  poisoned.

  Every run uses this one task, so all runs share one compiled step (see
  `_compilation_cache`); on clean batches it is exactly Muse's step.
  """

  def step(self, parts, frozen, batch, rng):
    TRACES.append(1)
    metrics = super().step(parts, frozen, batch, rng)
    poisoned = jnp.max(jnp.abs(batch["text_emb"])) >= POISON
    return dict(metrics, loss=jnp.where(poisoned, jnp.nan, metrics["loss"]))


def _task():
  return ToyTask(CFG, OPT, mt.ObjectiveConfig(), num_steps=NUM_STEPS, seed=0)


def toy_data(seed=0, sigterm_at=None, poison_at=None):
  """A grain iterator of deterministic batches; batch i depends only on
  (seed, i). Returns (iterator, the list of indices it served).

  Every image is the same two-token pattern (trivially learnable); the text
  embeddings differ per batch, so replaying the wrong batches changes the
  trained parameters. `sigterm_at`/`poison_at` act when reading that batch.
  The reader runs in the calling thread without read-ahead, so `served` is
  exactly the batches the loop consumed.
  """
  served = []

  def make_batch(i):
    rng = np.random.default_rng([seed, i])
    tokens = np.tile(np.arange(CFG.seq_len) % 2, (BATCH, 1))
    batch = {
        "tokens": tokens.astype(np.int32),
        "text_emb": rng.normal(size=(BATCH, TEXT_LEN, CFG.text_dim)).astype(
            np.float32),
        "text_mask": np.ones((BATCH, TEXT_LEN), bool),
    }
    if i == poison_at:
      batch["text_emb"][0, 0, 0] = POISON
    if i == sigterm_at:
      # Only with a Python handler (the Checkpointer's) installed: the
      # default action would kill the test process.
      if not callable(signal.getsignal(signal.SIGTERM)):
        raise RuntimeError("no SIGTERM handler installed")
      os.kill(os.getpid(), signal.SIGTERM)
    served.append(int(i))
    return batch

  ds = grain.MapDataset.range(1_000_000).map(make_batch)
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(ds.to_iter_dataset(options)), served


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
  cache, runs with the same model and task compile once (~15 s of CPU each
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


def _train(workdir, data, mesh, rules, *, checkpoint_every, task=None):
  # Few checkpoints: each Orbax save of the 8-device state takes ~1 s here.
  loop = loop_lib.LoopConfig(num_steps=NUM_STEPS, log_every=1,
                             checkpoint_every=checkpoint_every,
                             keep_checkpoints=5, seed=0)
  models, summary = loop_lib.train(
      task or _task(), stage="toy", workdir=str(workdir), data=data,
      loop=loop, mesh=mesh, rules=rules, meta={"run": "test"})
  assert set(models) == {PART}
  return models[PART], summary


def _params(model):
  return jax.tree.map(np.asarray,
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _steps(workdir):
  ckdir = os.path.join(workdir, "checkpoints")
  return sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _last_per_step(records):
  """The last record of each step (a resumed run re-logs some steps)."""
  out = {}
  for r in records:
    if "step" in r:
      out.setdefault(r["step"], {}).update(r)
  return out


def _tb_events(logdir):
  """{tag: [(step, value or 'image')]} of the TensorBoard event files."""
  tags = {}
  files = [f for f in os.listdir(logdir) if "tfevents" in f]
  assert files, os.listdir(logdir)
  for name in files:
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecords: length, crc, payload, crc.
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        kind = "image" if v.HasField("image") else v.simple_value
        tags.setdefault(v.tag, []).append((event.step, kind))
  return tags


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mesh, rules):
  workdir = tmp_path_factory.mktemp("straight")
  data, served = toy_data()
  TRACES.clear()
  model, summary = _train(workdir, data, mesh, rules,
                          checkpoint_every=NUM_STEPS // 2)
  summary["traces"] = len(TRACES)
  return workdir, (data, served), model, summary


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, mesh, rules):
  """The same run, preempted (SIGTERM) during step 3: its last checkpoint."""
  workdir = tmp_path_factory.mktemp("preempted")
  data, served = toy_data(sigterm_at=2)
  previous = signal.getsignal(signal.SIGTERM)
  # The Checkpointer chains to the previous handler: make that a no-op.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  try:
    with pytest.raises(SystemExit) as exc:
      _train(workdir, data, mesh, rules, checkpoint_every=100)
    # The Checkpointer gave the previous handler back when it closed.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert exc.value.code == loop_lib.PREEMPTED_EXIT_CODE == 143
  assert served == [0, 1, 2]
  # Saved at once although off the 100-step interval.
  assert _steps(workdir) == [3]
  return workdir


# ---------------------------------------------------------------------------
# A plain run.
# ---------------------------------------------------------------------------


def test_train_runs_logs_and_checkpoints(straight_run, mesh, rules):
  workdir, (data, served), model, summary = straight_run
  assert summary["steps"] == NUM_STEPS and summary["resumed_from"] == 0
  assert summary["compile_s"] > 0 and summary["wall_s"] >= summary[
      "compile_s"]
  metrics = summary["final_metrics"]
  for key in ("loss", "masked_accuracy", "grad_norm", "param_norm",
              "update_norm", "mask_rate"):
    assert key in metrics, metrics
    assert math.isfinite(metrics[key]), (key, metrics)
  assert 0.0 <= metrics["masked_accuracy"] <= 1.0
  assert 0.0 < metrics["mask_rate"] <= 1.0
  assert metrics["grad_norm"] > 0 and metrics["update_norm"] > 0
  assert metrics["param_norm"] > 0
  # One JSONL record per logged step.
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  assert {k: records[-1][k] for k in metrics} == metrics
  assert all("steps_per_s" in r for r in records)
  # The same scalars as TensorBoard events.
  events = _tb_events(os.path.join(workdir, "tb"))
  for key in metrics:
    assert [s for s, _ in events[key]] == list(range(1, NUM_STEPS + 1)), key
  np.testing.assert_allclose([v for _, v in events["loss"]],
                             [r["loss"] for r in records], rtol=1e-6)
  # Checkpoints on the interval.
  assert _steps(workdir) == [NUM_STEPS // 2, NUM_STEPS]
  assert served == list(range(NUM_STEPS))
  # Parameters keep their (data-parallel: replicated) shardings.
  for x in jax.tree.leaves(nnx.state(model)):
    assert x.sharding.mesh.shape == mesh.shape
    assert x.sharding.is_fully_replicated
  # The final checkpoint holds the returned model, the optimizer, the
  # iterator's position and meta.
  abstract = loop_lib.abstract_state(_task(), mesh, rules)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), parts=(PART,),
      handle_sigterm=False, read_only=True)
  fresh, fresh_served = toy_data()
  states, meta = ckpt.restore(
      {PART: (abstract.states[PART][0], abstract.states[PART][1])},
      data_iter=fresh)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(states[PART][0], nnx.Param)),
               _params(model))
  assert int(states[PART][1]["step"][...]) == NUM_STEPS
  assert fresh.get_state() == data.get_state()
  next(fresh)
  assert fresh_served == [NUM_STEPS]
  assert meta == {"run": "test", "stage": "toy", "step": NUM_STEPS}
  # Samplers read the part's model alone.
  with nnx.use_eager_sharding(False):
    target = tr.MaskedTransformer(CFG, rngs=nnx.Rngs(1))
  checkpointing.restore_model(os.path.join(workdir, "checkpoints"), target,
                              PART)
  jax.tree.map(np.testing.assert_array_equal, _params(target), _params(model))


def test_loss_decreases_on_learnable_task(straight_run):
  records = _records(straight_run[0])
  first = np.mean([r["loss"] for r in records[:3]])
  last = np.mean([r["loss"] for r in records[-3:]])
  assert last < 0.5 * first, (first, last)
  assert records[-1]["masked_accuracy"] > 0.9, records[-1]


@pytest.fixture(scope="module")
def resumed_run(preempted_run, tmp_path_factory, mesh, rules):
  """A second call on the preempted run's directory, with a fresh iterator."""
  workdir = tmp_path_factory.mktemp("resumed") / "run"
  shutil.copytree(preempted_run, workdir)
  data, served = toy_data()
  TRACES.clear()
  model, summary = _train(workdir, data, mesh, rules, checkpoint_every=100)
  summary["traces"] = len(TRACES)
  return workdir, served, model, summary


def test_exact_resume(straight_run, resumed_run, mesh, rules):
  straight_dir, _, straight_model, _ = straight_run
  workdir, served, model, summary = resumed_run
  # Resumed at step 3 and at batch 3; ends where the straight run did.
  assert summary["resumed_from"] == 3 and summary["steps"] == NUM_STEPS
  assert served == list(range(3, NUM_STEPS))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-6),
               _params(model), _params(straight_model))
  # Every step's loss is the straight run's.
  straight = _last_per_step(_records(straight_dir))
  resumed = _last_per_step(_records(workdir))
  assert sorted(resumed) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([resumed[s]["loss"] for s in sorted(resumed)],
                             [straight[s]["loss"] for s in sorted(resumed)],
                             rtol=1e-6)
  # A third call has nothing left to do and returns the same model.
  data, served = toy_data()
  again, summary = _train(workdir, data, mesh, rules, checkpoint_every=100)
  assert summary["resumed_from"] == NUM_STEPS and served == []
  jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))


def test_fresh_run_traces_step_once(straight_run):
  assert straight_run[3]["traces"] == 1


def test_resumed_run_traces_step_once(resumed_run):
  assert resumed_run[3]["traces"] == 1


def test_non_finite_loss_raises(preempted_run, tmp_path, mesh, rules):
  workdir = tmp_path / "run"
  shutil.copytree(preempted_run, workdir)
  data, served = toy_data(poison_at=4)  # The batch of step 5.
  with pytest.raises(loop_lib.NonFiniteLossError) as exc:
    _train(workdir, data, mesh, rules, checkpoint_every=100)
  msg = str(exc.value)
  # Names the stage, the step and the last good checkpoint.
  assert re.search(r"\[toy\] non-finite metrics at step 5\b", msg), msg
  assert "'loss': nan" in msg
  assert "Last good checkpoint: 3" in msg
  assert os.path.join(str(workdir), "checkpoints") in msg
  assert served == [3, 4]
  assert _steps(workdir) == [3]  # Nothing saved past the failure.


# ---------------------------------------------------------------------------
# Two parts, two optimizers and a frozen module through the same loop.
# ---------------------------------------------------------------------------


def _run_script(workdir, *args):
  # Two fake devices (fewer than the tests' eight: faster to compile), and
  # one persistent compilation cache for the three runs.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "two_part_task.py"),
       str(workdir), "--num-steps", str(TWO_PART_STEPS),
       "--checkpoint-every", "2", *args],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


TWO_PART_STEPS = 8


def test_two_part_task_resumes_exactly_after_sigkill(tmp_path):
  # Uninterrupted.
  straight_dir = tmp_path / "straight"
  straight = _run_script(straight_dir)
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert f"[{tp.STAGE}] step {TWO_PART_STEPS}/{TWO_PART_STEPS}" in (
      straight.stdout)
  # Killed outright while reading the batch of step 6 (index 5).
  workdir, marker = tmp_path / "killed", tmp_path / "marker"
  killed = _run_script(workdir, "--kill-at", "5", "--marker", str(marker))
  assert killed.returncode == -signal.SIGKILL, (killed.returncode,
                                                killed.stderr[-3000:])
  assert marker.exists()
  assert not (workdir / "final.npz").exists()
  before = _last_per_step(_records(workdir))
  assert sorted(before) == [1, 2, 3, 4, 5]  # Every logged step survived.
  # Step 2's checkpoint is final; step 4's may still have been writing.
  assert 2 in _steps(workdir) and max(_steps(workdir)) <= 4
  # Run again on the same directory: it resumes.
  resumed = _run_script(workdir, "--kill-at", "5", "--marker", str(marker))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] in (2, 4), summary
  assert summary["steps"] == TWO_PART_STEPS
  assert f"[{tp.STAGE}] resumed from step {summary['resumed_from']}" in (
      resumed.stdout)
  # The resumed run's per-step losses are the uninterrupted run's.
  want = _last_per_step(_records(straight_dir))
  got = _last_per_step(_records(workdir))
  assert sorted(got) == sorted(want) == list(range(1, TWO_PART_STEPS + 1))
  keys = ("d_loss", "g_loss", "feature_loss", "gen/param_norm",
          "gen/update_norm", "gen/grad_norm", "disc/param_norm",
          "disc/update_norm", "disc/grad_norm")
  for step in want:
    for key in keys:
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-7,
                                 atol=1e-7, err_msg=f"{key} at step {step}")
  # So are both parts' final parameters.
  with np.load(straight_dir / "final.npz") as a, np.load(
      workdir / "final.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    assert {f.split("[")[0] for f in a.files} == {"gen", "disc"}
    for name in a.files:
      np.testing.assert_allclose(b[name], a[name], rtol=1e-7, atol=1e-7,
                                 err_msg=name)
  # The last checkpoint holds both parts' model and optimizer items.
  items = os.listdir(workdir / "checkpoints" / str(TWO_PART_STEPS))
  for name in ("gen.model", "gen.optimizer", "disc.model",
               "disc.optimizer", "data_iter", "meta"):
    assert name in items, items


@pytest.fixture(scope="module")
def two_part_setup(mesh, rules):
  task = tp.TwoPartTask(num_steps=4)
  batch = sharding.global_batch(tp.make_batch(0), mesh, rules)
  return task, batch


def test_frozen_modules_are_arguments_not_constants(two_part_setup, mesh,
                                                    rules):
  task, batch = two_part_setup
  frozen_graphdefs, frozen_a = loop_lib.split_frozen(task.frozen())
  frozen_b = jax.tree.map(lambda x: 2.0 * x + 0.5, frozen_a)
  state = loop_lib.create_state(task, mesh, rules)
  step = loop_lib.make_step(task, state, frozen_graphdefs, seed=0)
  task.traces = 0
  metrics = []
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    for frozen in (frozen_a, frozen_b, frozen_a):
      # The same starting state each time (the step donates its input).
      states = loop_lib.create_state(task, mesh, rules).states
      _, m = step(states, frozen, batch, jnp.asarray(0, jnp.int32))
      metrics.append(jax.device_get(m))
  # One trace and one compiled program for every frozen value.
  assert task.traces == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access
  a, b, a_again = metrics
  # The generator's loss reads the frozen network; the discriminator's
  # does not.
  assert a["feature_loss"] != b["feature_loss"]
  assert a["g_loss"] != b["g_loss"]
  assert a["d_loss"] == b["d_loss"]
  assert a_again["feature_loss"] == a["feature_loss"]
  # Two parts: the loop's norms are prefixed with the part's name.
  for part in ("gen", "disc"):
    for norm in ("param_norm", "update_norm", "grad_norm"):
      assert f"{part}/{norm}" in a, sorted(a)
  assert "param_norm" not in a


def test_training_a_subset_changes_only_its_params(tmp_path, mesh, rules):
  wrt = nnx.All(nnx.Param, nnx.PathContains("decoder"))
  task = tp.TwoPartTask(num_steps=3, gen_wrt=wrt)
  # The optimizer holds state for the trained subset only.
  abstract = loop_lib.abstract_state(task, mesh, rules)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(
                   nnx.to_pure_dict(abstract.states["gen"][1]))]
  assert any("decoder" in p for p in opt_paths)
  assert not any("encoder" in p for p in opt_paths), opt_paths
  models, summary = loop_lib.train(
      task, stage="decoder", workdir=tmp_path, data=tp.make_data(),
      loop=loop_lib.LoopConfig(num_steps=3, log_every=1), mesh=mesh,
      rules=rules)
  assert summary["final_metrics"]["gen/update_norm"] > 0
  before = tp.params({"gen": task.make_gen(), "disc": task.make_disc()})
  after = tp.params(models)
  assert sorted(before) == sorted(after)
  for name in before:
    if name.startswith("gen['encoder']"):
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    else:  # The decoder and the whole (fully trained) discriminator.
      assert not np.array_equal(after[name], before[name]), name


def test_eval_hook_runs_on_interval_and_at_end(tmp_path, mesh, rules):
  calls = []

  def fn(step, models, frozen):
    calls.append((step, sorted(models), sorted(frozen)))
    fake = models["gen"](jnp.asarray(tp.make_batch(99)["z"]))
    return {"value": float(step), "fake_mean": jnp.mean(fake),
            "images": {"grid": np.zeros((2, 4, 4, 3), np.uint8)}}

  task = tp.TwoPartTask(num_steps=5)
  loop_lib.train(
      task, stage="hooked", workdir=tmp_path, data=tp.make_data(),
      loop=loop_lib.LoopConfig(num_steps=5, log_every=5, eval_every=2),
      mesh=mesh, rules=rules,
      eval_hooks=[loop_lib.EvalHook("probe", fn)])
  assert calls == [(s, ["disc", "gen"], ["features"]) for s in (2, 4, 5)]
  records = _records(tmp_path)
  probes = [r for r in records if "probe/value" in r]
  assert [(r["step"], r["probe/value"]) for r in probes] == [
      (2, 2.0), (4, 4.0), (5, 5.0)]
  assert all(math.isfinite(r["probe/fake_mean"]) for r in probes)
  assert not any("probe/images" in r or "probe/grid" in r for r in records)
  # Training metrics on the log interval only.
  assert [r["step"] for r in records if "g_loss" in r] == [5]
  events = _tb_events(os.path.join(tmp_path, "tb"))
  assert [s for s, _ in events["probe/value"]] == [2, 4, 5]
  assert [v for _, v in events["probe/grid"]] == ["image"] * 3


# ---------------------------------------------------------------------------
# The optimizer recipe: weight decay on kernels only.
# ---------------------------------------------------------------------------


class Mixed(nnx.Module):
  """A kernel, a bias, a LayerNorm, an embedding table, a bare parameter."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.embed = nnx.Embed(5, 4, rngs=rngs)
    self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (3, 4)))
    self.norm = nnx.LayerNorm(4, rngs=rngs, bias_init=nnx.initializers.ones)
    self.dense = nnx.Linear(4, 4, rngs=rngs,
                            bias_init=nnx.initializers.ones)


@nnx.jit
def _zero_grad_update(model, opt):
  opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))


def _flat(model):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(
              nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


def _decay_once(decay):
  """One update with zero gradients: Adam's step is 0, only decay acts."""
  model = Mixed()
  cfg = optimizer_lib.OptimizerConfig(learning_rate=0.1, weight_decay=0.5,
                                      decay=decay)
  opt = nnx.Optimizer(model, cfg.make(10), wrt=nnx.Param)
  before = _flat(model)
  _zero_grad_update(model, opt)
  after = _flat(model)
  assert sorted(before) == sorted(after) == [
      "['dense']['bias']", "['dense']['kernel']", "['embed']['embedding']",
      "['norm']['bias']", "['norm']['scale']", "['pos_embed']"]
  return {p: (before[p], after[p]) for p in before}


def test_decay_kernels_only():
  pairs = _decay_once("kernels")
  for p, (b, a) in pairs.items():
    if p == "['dense']['kernel']":  # p <- p - lr * wd * p.
      np.testing.assert_allclose(a, b * (1 - 0.1 * 0.5), rtol=1e-6)
    else:  # Norm scale and bias, bias, embeddings: untouched.
      assert np.abs(b).sum() > 0, p
      np.testing.assert_array_equal(a, b, err_msg=p)


def test_decay_all():
  for p, (b, a) in _decay_once("all").items():
    np.testing.assert_allclose(a, b * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=p)
    assert np.abs(a).sum() < np.abs(b).sum(), p  # Everything shrinks.


def test_transformer_decays_exactly_its_kernels():
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: tr.MaskedTransformer(
        CFG, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  flags = {jax.tree_util.keystr(p): m for p, m in
           jax.tree_util.tree_leaves_with_path(
               optimizer_lib.kernel_mask(params))}
  decayed = sorted(p for p, m in flags.items() if m)
  # Every matmul kernel (attention, MLP, conditioner, head) and only them.
  assert decayed and all(p.endswith("['kernel'].value") for p in decayed)
  assert all(p in decayed for p in flags if "['kernel']" in p)
  for p in ("['token_embed']['embedding'].value", "['pos_embed'].value",
            "['final_norm']['scale'].value", "['final_norm']['bias'].value",
            "['blocks']['norm1']['scale'].value",
            "['blocks']['mlp']['wi']['bias'].value"):
    assert flags[p] is False, p
  assert any("cross_attn" in p for p in decayed)
  assert any("['mlp']['wi']" in p for p in decayed)


def test_bad_decay_raises():
  with pytest.raises(ValueError, match="'everything'"):
    optimizer_lib.OptimizerConfig(decay="everything")
