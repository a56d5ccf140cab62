"""Text -> images with trained models: encode, decode tokens, detokenize.

`TextToImage` ties a text encoder, the base masked transformer, its VQ
tokenizer and a sampler config together, and optionally Muse's cascade
(`SuperRes`): the base model's tokens condition the super-res model, whose
high-res tokens the super-res tokenizer decodes. Each model samples in one
compiled program (`sampling.sample`), and the super-res context (low-res
encoder + text) is computed once per request. Requests are cut into fixed-size
batches (one compiled program), each sharded over the mesh's data axis:
every device samples a slice, and the images are gathered to the host.
The same seed gives the same images, whatever the number of devices or
processes.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax.core import spmd as flax_spmd
import jax
import dataclasses

import numpy as np

from muse_jax.models import conditioning
from muse_jax.models import superres as superres_lib
from muse_jax.models import transformer as transformer_lib
from muse_jax.models import vqgan
from muse_jax import sampling
from muse_jax import sharding


@dataclasses.dataclass(frozen=True)
class SuperRes:
  """The cascade's second stage: its tokenizer, model and decoding."""

  vq: vqgan.VQModel
  model: superres_lib.SuperResTransformer
  sampler: sampling.SamplerConfig


class TextToImage:
  """Samples images for prompts (or for precomputed text embeddings)."""

  def __init__(self, vq: vqgan.VQModel,
               transformer: transformer_lib.MaskedTransformer,
               sampler: sampling.SamplerConfig, env, *, batch_size: int,
               text_encoder=None, superres: SuperRes | None = None):
    sampler.check_codebook(transformer.cfg.codebook_size)
    if superres is not None:
      superres.sampler.check_codebook(superres.model.cfg.codebook_size)
      low = superres.model.lowres_cfg
      if (low.grid_size, low.codebook_size) != (
          transformer.cfg.grid_size, transformer.cfg.codebook_size):
        raise ValueError(
            f"the super-res model expects {low.grid_size}^2 low-res tokens "
            f"of a {low.codebook_size}-code tokenizer; the base model makes "
            f"{transformer.cfg.grid_size}^2 of "
            f"{transformer.cfg.codebook_size}")
    self.vq = vq
    self.transformer = transformer
    self.sampler = sampler
    self.superres = superres
    self.env = env
    self.text_encoder = text_encoder
    shards = env.data_shards
    self.batch_size = max(1, -(-batch_size // shards)) * shards
    self._decode = jax.jit(lambda m, t: m.decode_from_indices(t))

  def _put(self, x: np.ndarray) -> jax.Array:
    return sharding.shard_host_batch(x, self.env.mesh, self.env.rules)

  def cascade_tokens(
      self, emb: np.ndarray, mask: np.ndarray, *, seed: int = 0,
      negative: tuple[np.ndarray, np.ndarray] | None = None,
      superres: bool = True, low_tokens: np.ndarray | None = None,
      offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(base token grids int32 [N, g, g], super-res grids [N, G, G] or
    None) for text embeddings [N, L, D]; the super-res model (when there is
    one and `superres`) decodes from the base tokens of the same batch.

    `low_tokens` (int [N, g, g] or [N, g*g], e.g. a real image's) replaces
    the base model's sampling: the super-res model alone runs on them.
    Batch b's randomness is `fold_in(key(seed), offset + b * batch_size)`:
    calls over consecutive slices of a prompt set (`offset` = the slice's
    start, a multiple of the batch size) sample what one call over the
    whole set does.
    """
    n, bs = emb.shape[0], self.batch_size
    grid = self.transformer.cfg.grid_size
    sr = self.superres if superres else None
    if low_tokens is not None:
      low = np.asarray(low_tokens).reshape(n, -1)
      if low.shape[1] != grid * grid:
        raise ValueError(f"low_tokens of shape {np.shape(low_tokens)} must "
                         f"be [{n}, {grid}, {grid}] (the base grid)")
      if sr is None:
        raise ValueError("low_tokens need a super-res stage")
    base_out, sr_out = [], []
    with jax.set_mesh(self.env.mesh), flax_spmd.logical_axis_rules(
        self.env.rules):
      for start in range(0, n, bs):
        rows = min(bs, n - start)
        e, m = (_pad_rows(a[start:start + bs], bs) for a in (emb, mask))
        cond = conditioning.Text(self._put(e), self._put(m))
        neg = None
        if negative is not None:
          neg = conditioning.Text(
              self._put(np.broadcast_to(negative[0], e.shape)),
              self._put(np.broadcast_to(negative[1], m.shape)))
        rng = jax.random.fold_in(jax.random.key(seed), offset + start)
        if low_tokens is None:
          tokens = sampling.sample(self.transformer, rng, cond,
                                   cfg=self.sampler, negative=neg)
        else:
          tokens = self._put(_pad_rows(
              low[start:start + bs], bs).astype(np.int32))
        base_out.append(sharding.to_host(tokens)[:rows])
        if sr is not None:
          sr_neg = None if neg is None else conditioning.LowRes(neg, tokens)
          hr = sampling.sample(
              sr.model, jax.random.fold_in(rng, 1 << 20),
              conditioning.LowRes(cond, tokens), cfg=sr.sampler,
              negative=sr_neg)
          sr_out.append(sharding.to_host(hr)[:rows])
    base = np.concatenate(base_out).reshape(n, grid, grid)
    if sr is None:
      return base, None
    g = sr.model.cfg.grid_size
    return base, np.concatenate(sr_out).reshape(n, g, g)

  def tokens(self, emb: np.ndarray, mask: np.ndarray, *, seed: int = 0,
             negative: tuple[np.ndarray, np.ndarray] | None = None
             ) -> np.ndarray:
    """Base token grids int32 [N, grid, grid] for text embeddings."""
    return self.cascade_tokens(emb, mask, seed=seed, negative=negative,
                               superres=False)[0]

  def decode(self, tokens: np.ndarray, vq: vqgan.VQModel | None = None
             ) -> np.ndarray:
    """uint8 images [N, S, S, 3] of token grids [N, grid, grid] (by the
    base tokenizer, or `vq`)."""
    vq = vq or self.vq
    n, bs = tokens.shape[0], self.batch_size
    out = []
    with jax.set_mesh(self.env.mesh):
      for start in range(0, n, bs):
        rows = min(bs, n - start)
        t = self._put(_pad_rows(tokens[start:start + bs], bs))
        out.append(sharding.to_host(self._decode(vq, t))[:rows])
    return vqgan.from_unit_range(np.concatenate(out))

  def decode_superres(self, tokens: np.ndarray) -> np.ndarray:
    """uint8 high-res images of super-res token grids."""
    if self.superres is None:
      raise ValueError("this TextToImage has no super-res stage")
    return self.decode(tokens, self.superres.vq)

  def from_embeddings(self, emb: np.ndarray, mask: np.ndarray, *,
                      seed: int = 0, negative=None, offset: int = 0
                      ) -> np.ndarray:
    """The final images: the cascade's high-res ones when there is a
    super-res stage, else the base model's (`offset`: `cascade_tokens`)."""
    base, hr = self.cascade_tokens(emb, mask, seed=seed, negative=negative,
                                   offset=offset)
    return self.decode(base) if hr is None else self.decode_superres(hr)

  def __call__(self, prompts: Sequence[str], *, seed: int = 0,
               negative_prompt: str | None = None) -> np.ndarray:
    """uint8 images [N, S, S, 3] for `prompts`."""
    if self.text_encoder is None:
      raise ValueError("TextToImage was built without a text encoder")
    text = self.text_encoder.encode(list(prompts))
    negative = None
    if negative_prompt is not None:
      neg = self.text_encoder.encode([negative_prompt])
      negative = (neg.embeddings[0], neg.mask[0])
    return self.from_embeddings(text.embeddings, text.mask, seed=seed,
                                negative=negative)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  x = np.asarray(x)
  if x.shape[0] == rows:
    return x
  pad = np.repeat(x[-1:], rows - x.shape[0], axis=0)
  return np.concatenate([x, pad])
