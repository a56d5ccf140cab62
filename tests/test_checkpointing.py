"""Tests of the Orbax checkpointing layer (muse_jax.checkpointing)."""

from __future__ import annotations

import functools
import gc
import os
import re
import shutil
import signal

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from muse_jax import checkpointing as ck
from muse_jax.models import transformer as tr

# A failed Orbax restore leaves un-awaited read coroutines behind; they are
# collected (and reported as unraisable) after each test, not in later ones.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_garbage():
  yield
  gc.collect()


CFG = tr.TransformerConfig(codebook_size=16, grid_size=4, text_dim=8,
                           width=16, depth=2, num_heads=2, mlp_dim=32)


def _make(seed=0, **overrides):
  cfg = tr.TransformerConfig(**dict(CFG.__dict__, **overrides))
  with nnx.use_eager_sharding(False):
    return tr.MaskedTransformer(cfg, rngs=nnx.Rngs(seed))


def _abstract(**overrides):
  cfg = tr.TransformerConfig(**dict(CFG.__dict__, **overrides))
  with nnx.use_eager_sharding(False):
    return nnx.state(nnx.eval_shape(
        lambda: tr.MaskedTransformer(cfg, rngs=nnx.Rngs(0))))


def _optimizer(model):
  return nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def _fake_update(model, optimizer, scale):
  # A deterministic "gradient" so the Adam moments become non-trivial.
  grads = jax.tree.map(lambda p: jnp.sin(p * scale),
                       nnx.state(model, nnx.Param))
  optimizer.update(model, grads)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens, emb, mask):
  return nnx.merge(graphdef, state)(tokens, emb, mask)


def _outputs(model):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 17, (2, CFG.seq_len)), jnp.int32)
  emb = jnp.asarray(rng.normal(size=(2, 3, CFG.text_dim)), jnp.float32)
  return np.asarray(_apply(*nnx.split(model), tokens, emb,
                           jnp.ones((2, 3), bool)))


def _pure(x):
  return nnx.to_pure_dict(x if isinstance(x, nnx.State) else nnx.state(x))


def _assert_trees_equal(a, b):
  a, b = _pure(a), _pure(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_trees_differ(a, b):
  leaves = zip(jax.tree.leaves(_pure(a)), jax.tree.leaves(_pure(b)))
  assert any(not np.array_equal(x, y) for x, y in leaves)


@pytest.fixture(scope="module")
def trained():
  """A model and optimizer after two updates (non-zero moments, count 2)."""
  model = _make(seed=0)
  opt = _optimizer(model)
  _fake_update(model, opt, 1.0)
  _fake_update(model, opt, 2.0)
  return model, opt


@pytest.fixture(scope="module")
def saved_dir(trained, tmp_path_factory):
  """One checkpoint (step 7) of `trained`, written asynchronously."""
  directory = tmp_path_factory.mktemp("ckpt") / "run"
  model, opt = trained
  ckpt = ck.Checkpointer(directory, handle_sigterm=False)
  ckpt.save(7, {"model": model, "optimizer": opt},
            data_iter={"epoch": 2, "position": [3, 1], "name": "shards-0"},
            meta={"stage": "base", "config_digest": "abc123"})
  ckpt.wait()
  ckpt.close()
  return directory


def _copy(src, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(src, dst)
  return dst


# ---------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------


def test_save_restore_roundtrip(trained, saved_dir):
  model, opt = trained
  assert int(opt.step[...]) == 2
  fresh = _make(seed=1)
  fresh_opt = _optimizer(fresh)
  _assert_trees_differ(fresh, model)
  ckpt = ck.Checkpointer(saved_dir, handle_sigterm=False)
  assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
  states, data_iter, meta = ckpt.restore(
      {"model": nnx.state(fresh), "optimizer": nnx.state(fresh_opt)})
  ckpt.close()
  nnx.update(fresh, states["model"])
  nnx.update(fresh_opt, states["optimizer"])
  _assert_trees_equal(fresh, model)
  _assert_trees_equal(fresh_opt, opt)
  np.testing.assert_array_equal(_outputs(fresh), _outputs(model))
  # JSON items round-trip exactly; meta gains the step.
  assert data_iter == {"epoch": 2, "position": [3, 1], "name": "shards-0"}
  assert meta == {"stage": "base", "config_digest": "abc123", "step": 7}


def test_restored_optimizer_continues_identically(trained, saved_dir):
  model, opt = trained
  # Continue the original for one step; do the same from the checkpoint.
  ref_model = _make(seed=0)
  ref_opt = _optimizer(ref_model)
  nnx.update(ref_model, nnx.state(model))
  nnx.update(ref_opt, nnx.state(opt))
  _fake_update(ref_model, ref_opt, 3.0)
  restored = _make(seed=5)
  restored_opt = _optimizer(restored)
  ckpt = ck.Checkpointer(saved_dir, handle_sigterm=False)
  states, _, _ = ckpt.restore(
      {"model": nnx.state(restored), "optimizer": nnx.state(restored_opt)})
  ckpt.close()
  nnx.update(restored, states["model"])
  nnx.update(restored_opt, states["optimizer"])
  _fake_update(restored, restored_opt, 3.0)
  _assert_trees_equal(restored, ref_model)
  _assert_trees_equal(restored_opt, ref_opt)


def test_restore_from_abstract_target(trained, saved_dir):
  model, _ = trained
  ckpt = ck.Checkpointer(saved_dir, handle_sigterm=False)
  states, _, _ = ckpt.restore({"model": _abstract()})
  ckpt.close()
  assert all(isinstance(x, jax.Array)
             for x in jax.tree.leaves(_pure(states["model"])))
  _assert_trees_equal(states["model"], model)


def test_restore_model(trained, saved_dir):
  model, _ = trained
  target = _make(seed=3)
  out = ck.restore_model(saved_dir, target)
  assert out is target
  np.testing.assert_array_equal(_outputs(target), _outputs(model))


def test_restore_specific_step_and_keep_n(tmp_path):
  model = _make(seed=0)
  ckpt = ck.Checkpointer(tmp_path, keep=2, save_interval_steps=1,
                         handle_sigterm=False)
  kernels = {}
  for step in range(1, 5):
    model.head_out.bias[...] = jnp.full_like(model.head_out.bias[...], step)
    ckpt.save(step, {"model": model}, data_iter={"pos": step})
    kernels[step] = np.asarray(model.head_out.bias[...])
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
  step_dirs = sorted(p for p in os.listdir(tmp_path) if p.isdigit())
  assert step_dirs == ["3", "4"], os.listdir(tmp_path)
  states, data_iter, meta = ckpt.restore({"model": _abstract()}, step=3)
  ckpt.close()
  np.testing.assert_array_equal(states["model"]["head_out"]["bias"][...],
                                kernels[3])
  assert data_iter == {"pos": 3} and meta == {"step": 3}


def test_maybe_save_interval_and_preemption(tmp_path):
  model = _make(seed=0)
  previous = signal.getsignal(signal.SIGTERM)
  try:
    ckpt = ck.Checkpointer(tmp_path, keep=10, save_interval_steps=3,
                           async_save=False)
    saved = [s for s in range(1, 6) if ckpt.maybe_save(s, {"model": model})]
    # On the interval (Orbax also saves the very first step it is offered).
    assert 3 in saved and not {2, 4, 5} & set(saved), saved
    assert not ckpt.preempted
    os.kill(os.getpid(), signal.SIGTERM)  # Handled: sets the flag.
    assert ckpt.preempted
    assert ckpt.maybe_save(7, {"model": model})  # Off-interval, but saved.
    ckpt.wait()
    assert ckpt.all_steps() == saved + [7]
    ckpt.close()
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_unknown_item_rejected(tmp_path):
  ckpt = ck.Checkpointer(tmp_path, handle_sigterm=False)
  with pytest.raises(ValueError, match="ema"):
    ckpt.save(1, {"ema": _abstract()})
  ckpt.close()


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_restore_without_checkpoint_names_directory(tmp_path):
  directory = tmp_path / "empty_run"
  ckpt = ck.Checkpointer(directory, handle_sigterm=False)
  with pytest.raises(ck.CheckpointError, match=re.escape(str(directory))):
    ckpt.restore({"model": _abstract()})
  ckpt.close()


def test_restore_model_missing_directory(tmp_path):
  missing = tmp_path / "does_not_exist"
  with pytest.raises(ck.CheckpointError, match=re.escape(str(missing))):
    ck.restore_model(missing, _make())
  assert not missing.exists()  # Not created as a side effect.


def test_restore_model_empty_directory(tmp_path):
  with pytest.raises(ck.CheckpointError,
                     match="no checkpoint.*" + re.escape(str(tmp_path))):
    ck.restore_model(tmp_path, _make())


def _corrupt(item_dir, mode):
  files = [os.path.join(r, f) for r, _, fs in os.walk(item_dir) for f in fs]
  data = [f for f in files if f"{os.sep}d{os.sep}" in f]
  assert data, files
  if mode == "delete_item":
    shutil.rmtree(item_dir)
  elif mode == "delete_manifest":
    os.remove(os.path.join(item_dir, "manifest.ocdbt"))
  elif mode == "garbage":
    for f in data:
      with open(f, "wb") as fh:
        fh.write(b"not an ocdbt file")
  elif mode == "truncate":
    for f in data:
      os.truncate(f, os.path.getsize(f) // 2)
  elif mode == "bitflip":
    for f in data:
      with open(f, "rb") as fh:
        b = bytearray(fh.read())
      b[len(b) // 2] ^= 0xFF
      with open(f, "wb") as fh:
        fh.write(bytes(b))
  elif mode == "garbage_everything":
    for f in files:
      with open(f, "wb") as fh:
        fh.write(b"garbage")


@pytest.mark.parametrize("mode", [
    "delete_item", "delete_manifest", "garbage", "truncate", "bitflip",
    "garbage_everything"])
def test_corrupt_checkpoint_raises_naming_directory(saved_dir, tmp_path,
                                                    mode):
  directory = _copy(saved_dir, tmp_path)
  _corrupt(directory / "7" / "model", mode)
  ckpt = ck.Checkpointer(directory, handle_sigterm=False)
  with pytest.raises(ck.CheckpointError,
                     match=re.escape(str(directory))) as exc:
    ckpt.restore({"model": _abstract()})
  ckpt.close()
  assert "step 7" in str(exc.value)
  # The samplers' entry point reports it the same way.
  with pytest.raises(ck.CheckpointError, match=re.escape(str(directory))):
    ck.restore_model(directory, _make())


@pytest.mark.parametrize("overrides", [dict(width=32), dict(depth=3),
                                       dict(codebook_size=32)])
def test_restore_into_different_shape_raises(saved_dir, overrides):
  ckpt = ck.Checkpointer(saved_dir, handle_sigterm=False)
  with pytest.raises(ck.CheckpointError, match=re.escape(str(saved_dir))):
    ckpt.restore({"model": _abstract(**overrides)})
  ckpt.close()


def test_restore_into_different_structure_raises(saved_dir):
  # An optimizer state is not a model.
  model = _make()
  ckpt = ck.Checkpointer(saved_dir, handle_sigterm=False)
  with pytest.raises(ck.CheckpointError):
    ckpt.restore({"model": nnx.state(_optimizer(model))})
  ckpt.close()
