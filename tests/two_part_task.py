"""A two-part task for the training-loop tests, and a script that trains it.

Two trained parts with two optimizers, a tiny generator MLP (`gen`) and a
tiny discriminator MLP (`disc`), trained adversarially, each by its own
`minimize` in one step; and one frozen module (`features`: a fixed random
feature network) that the generator's loss reads (feature matching) and the
loop passes to the step as an argument.

As a script (`python tests/two_part_task.py WORKDIR --num-steps N ...`) it
trains the task through `training.loop.train` on a grain pipeline whose
batch i depends only on (seed, i). `--kill-at I --marker PATH`: the data map
function SIGKILLs its own process when it reads example I and PATH does not
exist yet (it creates PATH first, so a rerun on the same workdir resumes
instead of dying again). The reader runs in the main thread (no read-ahead),
so the kill lands exactly at that batch. Prints the summary as JSON on its
last line and writes the final parameters to `WORKDIR/final.npz`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

from flax import nnx  # pylint: disable=g-import-not-at-top
import grain
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import sharding
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import task as task_lib

BATCH = 8  # Divisible by the 8-way data axis of the tests' mesh.
Z_DIM = 3
DATA_DIM = 4
HIDDEN = 8
FEATURES = 5
STAGE = "two_part"


class MLP(nnx.Module):
  """encoder -> tanh -> decoder."""

  def __init__(self, din: int, dout: int, seed: int):
    rngs = nnx.Rngs(seed)
    self.encoder = nnx.Linear(din, HIDDEN, rngs=rngs)
    self.decoder = nnx.Linear(HIDDEN, dout, rngs=rngs)

  def __call__(self, x):
    return self.decoder(jnp.tanh(self.encoder(x)))


class Features(nnx.Module):
  """A fixed random feature network (never trained)."""

  def __init__(self, seed: int):
    self.proj = nnx.Linear(DATA_DIM, FEATURES, rngs=nnx.Rngs(seed))

  def __call__(self, x):
    return jnp.sin(self.proj(x))


def disc_loss(disc, gen, batch):
  fake = gen(batch["z"])
  real_logits, fake_logits = disc(batch["real"]), disc(fake)
  loss = jnp.mean(jax.nn.softplus(-real_logits) +
                  jax.nn.softplus(fake_logits))
  return loss, {"disc_real": jnp.mean(real_logits)}


def gen_loss(gen, disc, features, batch):
  fake = gen(batch["z"])
  adversarial = jnp.mean(jax.nn.softplus(-disc(fake)))
  matching = jnp.mean((jnp.mean(features(fake), 0) -
                       jnp.mean(features(batch["real"]), 0)) ** 2)
  return adversarial + matching, {"feature_loss": matching}


class TwoPartTask(task_lib.Task):
  """gen and disc, each with its own optimizer; features frozen."""

  def __init__(self, num_steps: int, *, seed: int = 0, feature_seed: int = 7,
               gen_wrt=nnx.Param, learning_rate: float = 1e-2):
    self.num_steps = num_steps
    self.seed = seed
    self.feature_seed = feature_seed
    self.gen_wrt = gen_wrt
    self.optimizer = optimizer_lib.OptimizerConfig(
        learning_rate=learning_rate, warmup_steps=2)
    self.traces = 0  # Python runs `step` only when the loop traces it.

  def make_gen(self):
    return MLP(Z_DIM, DATA_DIM, self.seed)

  def make_disc(self):
    return MLP(DATA_DIM, 1, self.seed + 1)

  def parts(self):
    return {
        "gen": task_lib.Part(self.make_gen,
                             self.optimizer.make(self.num_steps),
                             self.gen_wrt),
        # A different learning rate: two optimizers, not one shared.
        "disc": task_lib.Part(self.make_disc, optimizer_lib.OptimizerConfig(
            learning_rate=self.optimizer.learning_rate / 2).make(
                self.num_steps)),
    }

  def frozen(self):
    return {"features": Features(self.feature_seed)}

  def step(self, parts, frozen, batch, rng):
    del rng
    self.traces += 1
    gen, disc = parts["gen"], parts["disc"]
    d_loss, d_metrics = disc.minimize(disc_loss, gen.model, batch)
    g_loss, g_metrics = gen.minimize(gen_loss, disc.model,
                                     frozen["features"], batch)
    return dict(d_metrics, **g_metrics, d_loss=d_loss, g_loss=g_loss)


def make_batch(index: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Batch `index`: a pure function of (seed, index)."""
  rng = np.random.default_rng([seed, index])
  return {
      "z": rng.normal(size=(BATCH, Z_DIM)).astype(np.float32),
      "real": (1.0 + 0.5 * rng.normal(size=(BATCH, DATA_DIM))).astype(
          np.float32),
  }


def make_data(seed: int = 0, kill_at: int | None = None,
              marker: str | None = None) -> grain.DatasetIterator:
  """A grain iterator of `make_batch(i)`, read in the calling thread."""

  def fn(index):
    if index == kill_at and not os.path.exists(marker):
      with open(marker, "w") as f:
        f.write(str(index))
      os.kill(os.getpid(), signal.SIGKILL)
    return make_batch(index, seed)

  ds = grain.MapDataset.range(1_000_000).map(fn)
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(ds.to_iter_dataset(options))


def params(models: dict[str, nnx.Module]) -> dict[str, np.ndarray]:
  """Every part's parameters, flat (`part/path` -> array)."""
  out = {}
  for name, model in models.items():
    for path, x in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))):
      out[name + jax.tree_util.keystr(path)] = np.asarray(x)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--num-steps", type=int, default=8)
  parser.add_argument("--checkpoint-every", type=int, default=2)
  parser.add_argument("--kill-at", type=int, default=None)
  parser.add_argument("--marker", default=None)
  args = parser.parse_args(argv)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  loop = loop_lib.LoopConfig(num_steps=args.num_steps, log_every=1,
                             checkpoint_every=args.checkpoint_every,
                             keep_checkpoints=10, seed=0)
  models, summary = loop_lib.train(
      TwoPartTask(args.num_steps), stage=STAGE, workdir=args.workdir,
      data=make_data(kill_at=args.kill_at, marker=args.marker), loop=loop,
      mesh=mesh, rules=rules)
  np.savez(os.path.join(args.workdir, "final.npz"), **params(models))
  print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
  main()
