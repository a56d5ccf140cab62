"""The VQ tokenizer task: reconstruction + codebook + commitment losses.

One part, the tokenizer (`models.vqgan.VQModel`), trained on images in
[-1, 1]. An evaluation hook reports codebook usage and perplexity on
held-out images (`codebook_usage_hook`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models import vqgan
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import task as task_lib

PART = "vq"


def _loss(model, batch):
  return vqgan.vq_loss(model, batch["images"])


class VQTask(task_lib.Task):
  """Trains the whole tokenizer, or with `wrt` a subset of it (e.g. the
  decoder: `nnx.All(nnx.Param, nnx.PathContains("decoder"))`)."""

  def __init__(self, model: vqgan.VQConfig,
               optimizer: optimizer_lib.OptimizerConfig, *, num_steps: int,
               seed: int = 0, wrt=nnx.Param):
    self.model_cfg = model
    self.optimizer_cfg = optimizer
    self.num_steps = num_steps
    self.seed = seed
    self.wrt = wrt

  def make_model(self) -> vqgan.VQModel:
    return vqgan.VQModel(self.model_cfg, rngs=nnx.Rngs(self.seed))

  def parts(self) -> dict[str, task_lib.Part]:
    return {PART: task_lib.Part(self.make_model,
                                self.optimizer_cfg.make(self.num_steps),
                                self.wrt)}

  def step(self, parts, frozen, batch, rng):
    del frozen, rng
    loss, metrics = parts[PART].minimize(_loss, batch)
    return dict(metrics, loss=loss)


def codebook_usage_hook(images: Iterable[np.ndarray]) -> loop_lib.EvalHook:
  """Codebook usage and token perplexity on fixed held-out image batches."""
  batches = [jnp.asarray(b) for b in images]
  encode = jax.jit(lambda m, x: m.encode_to_indices(x))

  def fn(step, models, frozen):
    del step, frozen
    model = models[PART]
    ids = np.concatenate([np.asarray(encode(model, b)).ravel()
                          for b in batches])
    counts = np.bincount(ids, minlength=model.config.codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"codebook_usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}

  return loop_lib.EvalHook("heldout", fn)
