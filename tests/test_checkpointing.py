"""Tests of the Orbax checkpointing layer (muse_jax.checkpointing).

A checkpoint holds named parts (each a `<part>.model` and a
`<part>.optimizer` item), the grain iterator's state (`data_iter`, grain's
own Orbax handler) and JSON metadata (`meta`).
"""

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
from muse_jax.data import pipeline
from muse_jax.models import conditioning
from muse_jax.models import transformer as tr
from muse_jax import sharding

# A failed Orbax restore leaves un-awaited read coroutines behind; they are
# collected (and reported as unraisable) after each test, not in later ones.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")

PARTS = ("transformer", "critic")


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


class Critic(nnx.Module):
  """The second part: a tiny MLP (a discriminator, say)."""

  def __init__(self, seed=0, width=8):
    rngs = nnx.Rngs(seed)
    self.hidden = nnx.Linear(CFG.width, width, rngs=rngs)
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


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
  model = nnx.merge(graphdef, state)
  return model(tokens, model.context(conditioning.Text(emb, mask)))


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


def _data(seed=0):
  """A real pipeline iterator (reader threads and read-ahead included)."""
  source = pipeline.ArraySource({"x": np.arange(64, dtype=np.int32)})
  return pipeline.make_iterator(source, batch_size=4, seed=seed)


def _checkpointer(directory, parts=PARTS, **kwargs):
  kwargs.setdefault("handle_sigterm", False)
  return ck.Checkpointer(directory, parts=parts, **kwargs)


def _abstract_target(opt=True):
  """Abstract targets for both parts; the optimizers from fresh ones."""
  target = {"transformer": (_abstract(), None), "critic": (
      nnx.state(nnx.eval_shape(Critic)), None)}
  if opt:
    model, critic = _make(seed=1), Critic(seed=1)
    target = {"transformer": (target["transformer"][0],
                              nnx.state(_optimizer(model))),
              "critic": (target["critic"][0], nnx.state(_optimizer(critic)))}
  return target


@pytest.fixture(scope="module")
def trained():
  """Both parts after two updates (non-zero moments, count 2) and a data
  iterator that served three batches."""
  model, critic = _make(seed=0), Critic(seed=0)
  opt, critic_opt = _optimizer(model), _optimizer(critic)
  for scale in (1.0, 2.0):
    _fake_update(model, opt, scale)
    _fake_update(critic, critic_opt, scale)
  data = _data()
  served = [next(data)["x"] for _ in range(3)]
  return {"transformer": (model, opt), "critic": (critic, critic_opt),
          "data": data, "served": served}


@pytest.fixture(scope="module")
def saved_dir(trained, tmp_path_factory):
  """One checkpoint (step 7) of `trained`, written asynchronously."""
  directory = tmp_path_factory.mktemp("ckpt") / "run"
  ckpt = _checkpointer(directory)
  ckpt.save(7, {p: trained[p] for p in PARTS}, data_iter=trained["data"],
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


def test_checkpoint_layout(saved_dir):
  items = sorted(os.listdir(saved_dir / "7"))
  for name in ("transformer.model", "transformer.optimizer", "critic.model",
               "critic.optimizer", "data_iter", "meta"):
    assert name in items, items
  # grain's handler: one JSON file per process.
  files = os.listdir(saved_dir / "7" / "data_iter")
  assert len([f for f in files if f.endswith(".json")]) == 1, files


def test_save_restore_roundtrip(trained, saved_dir):
  model, opt = trained["transformer"]
  critic, critic_opt = trained["critic"]
  assert int(opt.step[...]) == 2 and int(critic_opt.step[...]) == 2
  fresh, fresh_critic = _make(seed=1), Critic(seed=1)
  fresh_opt, fresh_critic_opt = _optimizer(fresh), _optimizer(fresh_critic)
  _assert_trees_differ(fresh, model)
  _assert_trees_differ(fresh_critic, critic)
  ckpt = _checkpointer(saved_dir)
  assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
  data = _data()
  states, meta = ckpt.restore(
      {"transformer": (nnx.state(fresh), nnx.state(fresh_opt)),
       "critic": (nnx.state(fresh_critic), nnx.state(fresh_critic_opt))},
      data_iter=data)
  ckpt.close()
  assert set(states) == set(PARTS)
  nnx.update(fresh, states["transformer"][0])
  nnx.update(fresh_opt, states["transformer"][1])
  nnx.update(fresh_critic, states["critic"][0])
  nnx.update(fresh_critic_opt, states["critic"][1])
  _assert_trees_equal(fresh, model)
  _assert_trees_equal(fresh_opt, opt)
  _assert_trees_equal(fresh_critic, critic)
  _assert_trees_equal(fresh_critic_opt, critic_opt)
  np.testing.assert_array_equal(_outputs(fresh), _outputs(model))
  # The iterator resumes at the batch after the three served ones.
  reference = _data()
  expected = [next(reference)["x"] for _ in range(5)]
  np.testing.assert_array_equal(np.stack(trained["served"]),
                                np.stack(expected[:3]))
  np.testing.assert_array_equal(next(data)["x"], expected[3])
  np.testing.assert_array_equal(next(data)["x"], expected[4])
  # Meta round-trips exactly and gains the step.
  assert meta == {"stage": "base", "config_digest": "abc123", "step": 7}


def test_restore_without_data_iter_leaves_iterator_alone(saved_dir):
  ckpt = _checkpointer(saved_dir, read_only=True)
  states, meta = ckpt.restore(_abstract_target(opt=False))
  ckpt.close()
  assert meta["step"] == 7
  assert states["transformer"][1] is None and states["critic"][1] is None


def test_restored_optimizer_continues_identically(trained, saved_dir):
  model, opt = trained["transformer"]
  # Continue the original for one step; do the same from the checkpoint.
  ref_model = _make(seed=0)
  ref_opt = _optimizer(ref_model)
  nnx.update(ref_model, nnx.state(model))
  nnx.update(ref_opt, nnx.state(opt))
  _fake_update(ref_model, ref_opt, 3.0)
  restored = _make(seed=5)
  restored_opt = _optimizer(restored)
  ckpt = _checkpointer(saved_dir)
  states, _ = ckpt.restore(
      {"transformer": (nnx.state(restored), nnx.state(restored_opt))})
  ckpt.close()
  nnx.update(restored, states["transformer"][0])
  nnx.update(restored_opt, states["transformer"][1])
  _fake_update(restored, restored_opt, 3.0)
  _assert_trees_equal(restored, ref_model)
  _assert_trees_equal(restored_opt, ref_opt)


def test_restore_from_abstract_target_with_shardings(trained, saved_dir):
  model, opt = trained["transformer"]
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)

  def make():
    m = tr.MaskedTransformer(CFG, rngs=nnx.Rngs(0))
    return m, _optimizer(m)

  _, abstract, _ = sharding.abstract_state(make, mesh, rules)
  ckpt = _checkpointer(saved_dir)
  states, _ = ckpt.restore({"transformer": (abstract[0], abstract[1])})
  ckpt.close()
  for restored, target in ((states["transformer"][0], abstract[0]),
                           (states["transformer"][1], abstract[1])):
    leaves = jax.tree.leaves(restored)
    targets = jax.tree.leaves(target)
    assert len(leaves) == len(targets)
    for x, t in zip(leaves, targets):
      assert isinstance(x, jax.Array)
      assert x.sharding.is_equivalent_to(t.sharding, x.ndim), (x.sharding,
                                                              t.sharding)
  # Some parameters are really sharded (embed -> fsdp).
  assert not all(x.sharding.is_fully_replicated
                 for x in jax.tree.leaves(states["transformer"][0]))
  _assert_trees_equal(states["transformer"][0], model)
  _assert_trees_equal(states["transformer"][1], opt)


@pytest.mark.parametrize("part", PARTS)
def test_restore_model(trained, saved_dir, part):
  model, _ = trained[part]
  target = _make(seed=3) if part == "transformer" else Critic(seed=3)
  out = ck.restore_model(saved_dir, target, part)
  assert out is target
  _assert_trees_equal(target, model)
  if part == "transformer":
    np.testing.assert_array_equal(_outputs(target), _outputs(model))


def test_restore_model_into_abstract_model(trained, saved_dir):
  critic, _ = trained["critic"]
  target = nnx.eval_shape(lambda: Critic(seed=3))
  ck.restore_model(saved_dir, target, "critic")
  _assert_trees_equal(target, critic)


def test_restore_specific_step_and_keep_n(tmp_path):
  model = _make(seed=0)
  critic = Critic(seed=0)
  opt, critic_opt = _optimizer(model), _optimizer(critic)
  ckpt = _checkpointer(tmp_path, keep=2, save_interval_steps=1)
  data = _data()
  reference = _data()
  batches = [next(reference)["x"] for _ in range(5)]
  biases = {}
  for step in range(1, 5):
    model.head_out.bias[...] = jnp.full_like(model.head_out.bias[...], step)
    critic.out.bias[...] = jnp.full_like(critic.out.bias[...], -step)
    next(data)
    ckpt.save(step, {"transformer": (model, opt),
                     "critic": (critic, critic_opt)}, data_iter=data)
    biases[step] = (np.asarray(model.head_out.bias[...]),
                    np.asarray(critic.out.bias[...]))
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
  step_dirs = sorted(p for p in os.listdir(tmp_path) if p.isdigit())
  assert step_dirs == ["3", "4"], os.listdir(tmp_path)
  data = _data()
  states, meta = ckpt.restore(_abstract_target(), step=3, data_iter=data)
  ckpt.close()
  np.testing.assert_array_equal(
      states["transformer"][0]["head_out"]["bias"][...], biases[3][0])
  np.testing.assert_array_equal(states["critic"][0]["out"]["bias"][...],
                                biases[3][1])
  np.testing.assert_array_equal(next(data)["x"], batches[3])
  assert meta == {"step": 3}


def test_maybe_save_interval_and_preemption(tmp_path):
  model = _make(seed=0)
  opt = _optimizer(model)
  states = {"transformer": (model, opt)}
  previous = signal.getsignal(signal.SIGTERM)
  try:
    ckpt = ck.Checkpointer(tmp_path, parts=("transformer",), keep=10,
                           save_interval_steps=3, async_save=False)
    saved = [s for s in range(1, 6) if ckpt.maybe_save(s, states)]
    # On the interval (Orbax may also save the very first step offered).
    assert 3 in saved and not {2, 4, 5} & set(saved), saved
    assert not ckpt.preempted(6)
    os.kill(os.getpid(), signal.SIGTERM)  # Handled: sets the flag.
    assert ckpt.preempted(7)
    assert ckpt.maybe_save(7, states)  # Off-interval, but saved.
    ckpt.wait()
    assert ckpt.all_steps() == saved + [7]
    ckpt.close()
    # Closing gives SIGTERM its previous handler back.
    assert signal.getsignal(signal.SIGTERM) == previous
    ckpt.close()  # Idempotent.
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_unknown_or_missing_part_rejected(tmp_path):
  model = _make()
  pair = (model, _optimizer(model))
  ckpt = _checkpointer(tmp_path)
  with pytest.raises(ValueError, match="ema"):
    ckpt.save(1, {"transformer": pair, "critic": pair, "ema": pair})
  with pytest.raises(ValueError, match="missing.*critic"):
    ckpt.save(1, {"transformer": pair})  # Every part must be saved.
  with pytest.raises(ValueError, match="ema"):
    ckpt.restore({"ema": (_abstract(), None)})
  ckpt.close()
  assert not any(p.isdigit() for p in os.listdir(tmp_path))
  with pytest.raises(ValueError, match="at least one part"):
    ck.Checkpointer(tmp_path / "none", parts=())


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_restore_without_checkpoint_names_directory(tmp_path):
  directory = tmp_path / "empty_run"
  ckpt = _checkpointer(directory)
  with pytest.raises(ck.CheckpointError, match=re.escape(str(directory))):
    ckpt.restore({"transformer": (_abstract(), None)})
  ckpt.close()


def test_restore_model_missing_directory(tmp_path):
  missing = tmp_path / "does_not_exist"
  with pytest.raises(ck.CheckpointError, match=re.escape(str(missing))):
    ck.restore_model(missing, _make(), "transformer")
  assert not missing.exists()  # Not created as a side effect.


def test_restore_model_empty_directory(tmp_path):
  with pytest.raises(ck.CheckpointError,
                     match="no checkpoint.*" + re.escape(str(tmp_path))):
    ck.restore_model(tmp_path, _make(), "transformer")


def test_restore_model_unknown_part_names_directory(saved_dir):
  with pytest.raises(ck.CheckpointError, match=re.escape(str(saved_dir))):
    ck.restore_model(saved_dir, _make(), "ema")


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
  _corrupt(directory / "7" / "transformer.model", mode)
  ckpt = _checkpointer(directory)
  with pytest.raises(ck.CheckpointError,
                     match=re.escape(str(directory))) as exc:
    ckpt.restore({"transformer": (_abstract(), None)})
  ckpt.close()
  assert "step 7" in str(exc.value)
  # The samplers' entry point reports it the same way.
  with pytest.raises(ck.CheckpointError, match=re.escape(str(directory))):
    ck.restore_model(directory, _make(), "transformer")
  # The other part is intact and still restores.
  critic = Critic(seed=4)
  ck.restore_model(directory, critic, "critic")


@pytest.mark.parametrize("overrides", [dict(width=32), dict(depth=3),
                                       dict(codebook_size=32)])
def test_restore_into_different_shape_raises(saved_dir, overrides):
  ckpt = _checkpointer(saved_dir)
  with pytest.raises(ck.CheckpointError, match=re.escape(str(saved_dir))):
    ckpt.restore({"transformer": (_abstract(**overrides), None)})
  ckpt.close()


def test_restore_into_different_structure_raises(saved_dir):
  model = _make()
  ckpt = _checkpointer(saved_dir)
  # An optimizer state is not a model.
  with pytest.raises(ck.CheckpointError, match=re.escape(str(saved_dir))):
    ckpt.restore({"transformer": (nnx.state(_optimizer(model)), None)})
  # Nor is one part's model another's.
  with pytest.raises(ck.CheckpointError, match=re.escape(str(saved_dir))):
    ckpt.restore({"critic": (_abstract(), None)})
  ckpt.close()
