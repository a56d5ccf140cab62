"""Edits images with a trained workdir's models, at every resolution.

`Editor` wraps a `TextToImage` (tokenizers, base model, optional super-res
stage, text encoder) and applies `editing`'s zero-shot edits multi-scale,
as Muse does (P§3.3): the base model edits the tokens of the image
downsampled to its resolution; in a cascade the super-res model then edits
the high-res tokens of the full image, conditioned on the edited low-res
tokens.

* inpainting / outpainting: the region (a pixel mask; outpainting's is the
  complement of a kept region) is regenerated at both resolutions; every
  token outside it is kept bitwise at both.
* mask-free editing: the base tokens are resampled iteratively towards the
  new prompt (`editing.maskfree_edit`); the super-res model then decodes
  the high-res tokens from the edited low-res ones (its 8-step schedule),
  since a changed low-res image leaves no high-res token certainly valid.

Images are uint8 [S, S, 3] at the pipeline's output size (the super-res
side in a cascade, else the base side); `prepare_image` converts and
resizes other inputs with a warning.
"""

from __future__ import annotations

import warnings

from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from muse_jax import editing
from muse_jax import sampling
from muse_jax.models import conditioning
from muse_jax.models import vqgan
from muse_jax.text_to_image import TextToImage

MODES = ("inpaint", "outpaint", "maskfree")


def prepare_image(image: Image.Image, size: int, name: str = "image"
                  ) -> np.ndarray:
  """uint8 [size, size, 3] of a PIL image: non-RGB converted and other
  sizes resized (bicubic), each with a warning naming the change."""
  if image.mode != "RGB":
    warnings.warn(f"{name}: mode {image.mode} converted to RGB")
    image = image.convert("RGB")
  if image.size != (size, size):
    warnings.warn(f"{name}: {image.size[0]}x{image.size[1]} resized to "
                  f"{size}x{size} (the model's image size)")
    image = image.resize((size, size), Image.BICUBIC)
  return np.asarray(image, np.uint8)


def prepare_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """A bool pixel mask resized (nearest) to [size, size]."""
  mask = np.asarray(mask, bool)
  if mask.shape == (size, size):
    return mask
  img = Image.fromarray(mask.astype(np.uint8) * 255)
  return np.asarray(img.resize((size, size), Image.NEAREST)) > 127


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Box-filter downsampling of uint8 [S, S, 3] by an integer factor."""
  if factor == 1:
    return image
  s = image.shape[0] // factor
  x = image.astype(np.float32).reshape(s, factor, s, factor, 3)
  return np.clip(np.round(x.mean(axis=(1, 3))), 0, 255).astype(np.uint8)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
  """A low-res pixel is in the region when any of its pixels is."""
  if factor == 1:
    return mask
  s = mask.shape[0] // factor
  return mask.reshape(s, factor, s, factor).any(axis=(1, 3))


class Editor:
  """Zero-shot edits of one image at a time through a `TextToImage`."""

  def __init__(self, generator: TextToImage):
    if generator.text_encoder is None:
      raise ValueError("the Editor needs a TextToImage with a text encoder")
    self.g = generator
    self.base_f = generator.vq.config.downsample_factor
    self.base_size = generator.transformer.cfg.grid_size * self.base_f
    sr = generator.superres
    self.sr_f = sr.vq.config.downsample_factor if sr else None
    self.size = sr.model.cfg.grid_size * self.sr_f if sr else self.base_size
    self._encode = jax.jit(lambda m, x: m.encode_to_indices(x))

  def _condition(self, prompt: str) -> conditioning.Text:
    if not prompt.strip():
      raise ValueError("the prompt is empty")
    text = self.g.text_encoder.encode([prompt])
    return conditioning.Text(jnp.asarray(text.embeddings),
                             jnp.asarray(text.mask))

  def _negative(self, prompt: str | None) -> conditioning.Text | None:
    return None if prompt is None else self._condition(prompt)

  def _tokens(self, vq: vqgan.VQModel, image: np.ndarray) -> jax.Array:
    ids = self._encode(vq, vqgan.to_unit_range(image[None]))
    return ids.reshape(1, -1).astype(jnp.int32)

  def _check(self, image: np.ndarray) -> None:
    if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
      raise ValueError(f"image of shape {image.shape} ({image.dtype}) must "
                       f"be uint8 [{self.size}, {self.size}, 3] "
                       "(see prepare_image)")

  def _decode(self, base: jax.Array, hr: jax.Array | None) -> np.ndarray:
    if hr is None:
      grid = self.g.transformer.cfg.grid_size
      return self.g.decode(np.asarray(base).reshape(1, grid, grid))[0]
    grid = self.g.superres.model.cfg.grid_size
    return self.g.decode_superres(np.asarray(hr).reshape(1, grid, grid))[0]

  def inpaint(self, image: np.ndarray, region: np.ndarray, prompt: str, *,
              seed: int = 0, negative_prompt: str | None = None
              ) -> np.ndarray:
    """The image with the pixel `region` (bool [S, S]) regenerated."""
    self._check(image)
    editing.check_mask_matches_image(region.shape, image.shape)
    region = np.asarray(region, bool)
    cond, neg = self._condition(prompt), self._negative(negative_prompt)
    rng = jax.random.key(seed)
    factor = self.size // self.base_size
    with jax.set_mesh(self.g.env.mesh), flax_spmd.logical_axis_rules(
        self.g.env.rules):
      low = self._tokens(self.g.vq, downsample(image, factor))
      low_mask = editing.token_mask_from_pixels(
          downsample_mask(region, factor), self.base_f)
      base = editing.inpaint(self.g.transformer, rng, cond, low,
                             jnp.asarray(low_mask), cfg=self.g.sampler,
                             negative=neg)
      hr = None
      sr = self.g.superres
      if sr is not None:
        hr_mask = editing.token_mask_from_pixels(region, self.sr_f)
        hr = editing.inpaint(
            sr.model, jax.random.fold_in(rng, 1), conditioning.LowRes(
                cond, base), self._tokens(sr.vq, image),
            jnp.asarray(hr_mask), cfg=sr.sampler,
            negative=None if neg is None else conditioning.LowRes(neg, base))
      return self._decode(base, hr)

  def outpaint(self, image: np.ndarray, keep: np.ndarray, prompt: str, *,
               seed: int = 0, negative_prompt: str | None = None
               ) -> np.ndarray:
    """The image regenerated around the kept pixels (bool [S, S])."""
    keep = np.asarray(keep, bool)
    editing.check_mask_matches_image(keep.shape, image.shape)
    if keep.all():
      raise ValueError("outpaint: the kept region is the whole image")
    return self.inpaint(image, ~keep, prompt, seed=seed,
                        negative_prompt=negative_prompt)

  def maskfree(self, image: np.ndarray, prompt: str, *, seed: int = 0,
               iterations: int = 100, fraction: float = 0.08,
               guidance_scale: float = 4.0, top_k: int = 3,
               negative_prompt: str | None = None,
               intermediate_every: int = 0
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(edited image, images after every `intermediate_every`-th
    iteration (base model's tokens through the cascade); [] when 0)."""
    self._check(image)
    cond, neg = self._condition(prompt), self._negative(negative_prompt)
    rng = jax.random.key(seed)
    factor = self.size // self.base_size
    with jax.set_mesh(self.g.env.mesh), flax_spmd.logical_axis_rules(
        self.g.env.rules):
      low = self._tokens(self.g.vq, downsample(image, factor))
      out = editing.maskfree_edit(
          self.g.transformer, rng, cond, low, fraction=fraction,
          iterations=iterations, guidance_scale=guidance_scale, top_k=top_k,
          negative=neg, return_intermediate=intermediate_every > 0,
          intermediate_every=max(1, intermediate_every))
      base, steps = out if intermediate_every > 0 else (out, None)
      results = [self._finish(cond, neg, b, rng)
                 for b in ([] if steps is None else list(steps))]
      return self._finish(cond, neg, base, rng), results

  def _finish(self, cond, neg, base, rng) -> np.ndarray:
    sr = self.g.superres
    hr = None
    if sr is not None:
      hr = sampling.sample(
          sr.model, jax.random.fold_in(rng, 1), conditioning.LowRes(
              cond, base), cfg=sr.sampler,
          negative=None if neg is None else conditioning.LowRes(neg, base))
    return self._decode(base, hr)
