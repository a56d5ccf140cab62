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

from collections.abc import Sequence
import contextlib
import dataclasses
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
  """Box-filter downsampling of uint8 [..., S, S, 3] by an integer factor."""
  if factor == 1:
    return image
  lead, s = image.shape[:-3], image.shape[-3] // factor
  x = image.astype(np.float32).reshape(*lead, s, factor, s, factor, 3)
  return np.clip(np.round(x.mean(axis=(-4, -2))), 0, 255).astype(np.uint8)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
  """[..., S, S] -> [..., S/f, S/f]: a low-res pixel is in the region when
  any of its pixels is."""
  if factor == 1:
    return mask
  lead, s = mask.shape[:-2], mask.shape[-2] // factor
  return mask.reshape(*lead, s, factor, s, factor).any(axis=(-3, -1))


@dataclasses.dataclass(frozen=True)
class Edited:
  """A batch of edits: the images and the tokens behind them.

  `base`/`hr` are the edited token grids flattened row-major ([B, n];
  `hr` None without a super-res stage); `source_base`/`source_hr` the
  source images' tokens; `base_region`/`hr_region` the tokens that were
  free to change (bool [B, n]; all True for mask-free edits).
  """

  images: np.ndarray
  base: np.ndarray
  source_base: np.ndarray
  base_region: np.ndarray
  hr: np.ndarray | None = None
  source_hr: np.ndarray | None = None
  hr_region: np.ndarray | None = None


class Editor:
  """Zero-shot edits of images through a `TextToImage`.

  The `*_batch` methods edit B images with one prompt each (one compiled
  program per batch shape); `inpaint`, `outpaint` and `maskfree` are their
  one-image forms.
  """

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

  def _condition(self, prompts: Sequence[str]) -> conditioning.Text:
    for p in prompts:
      if not p.strip():
        raise ValueError("the prompt is empty")
    text = self.g.text_encoder.encode(list(prompts))
    return conditioning.Text(jnp.asarray(text.embeddings),
                             jnp.asarray(text.mask))

  def _negative(self, prompt: str | Sequence[str] | None, batch: int
                ) -> conditioning.Text | None:
    """One negative prompt for the batch, or one per image."""
    if prompt is None:
      return None
    if not isinstance(prompt, str):
      if len(prompt) != batch:
        raise ValueError(f"{len(prompt)} negative prompts for {batch} "
                         "images: give one, or one per image")
      return self._condition(prompt)
    neg = self._condition([prompt])
    return conditioning.Text(
        jnp.broadcast_to(neg.embeddings, (batch,) + neg.embeddings.shape[1:]),
        jnp.broadcast_to(neg.mask, (batch,) + neg.mask.shape[1:]))

  def _tokens(self, vq: vqgan.VQModel, images: np.ndarray) -> jax.Array:
    ids = self._encode(vq, vqgan.to_unit_range(images))
    return ids.reshape(images.shape[0], -1).astype(jnp.int32)

  def _check(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    if (images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3)
        or images.dtype != np.uint8):
      raise ValueError(f"images of shape {images.shape} ({images.dtype}) "
                       f"must be uint8 [B, {self.size}, {self.size}, 3] "
                       "(see prepare_image)")
    if len(prompts) != images.shape[0]:
      raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} "
                       "images: give one prompt per image")

  def _decode(self, base: jax.Array, hr: jax.Array | None) -> np.ndarray:
    b = base.shape[0]
    if hr is None:
      grid = self.g.transformer.cfg.grid_size
      return self.g.decode(np.asarray(base).reshape(b, grid, grid))
    grid = self.g.superres.model.cfg.grid_size
    return self.g.decode_superres(np.asarray(hr).reshape(b, grid, grid))

  def _inputs(self, images, prompts: Sequence[str], seed: int,
              negative_prompt: str | Sequence[str] | None):
    """(checked uint8 images, text condition, negative or None, key)."""
    images = np.asarray(images)
    self._check(images, prompts)
    return (images, self._condition(prompts),
            self._negative(negative_prompt, len(prompts)),
            jax.random.key(seed))

  @contextlib.contextmanager
  def _scope(self):
    """The generator's mesh and logical-axis rules."""
    with jax.set_mesh(self.g.env.mesh), flax_spmd.logical_axis_rules(
        self.g.env.rules):
      yield

  def inpaint_batch(self, images: np.ndarray, regions: np.ndarray,
                    prompts: Sequence[str], *, seed: int = 0,
                    negative_prompt: str | Sequence[str] | None = None
                    ) -> Edited:
    """Images uint8 [B, S, S, 3] with the pixel `regions` (bool [B, S, S])
    regenerated under `prompts` (one each)."""
    editing.check_mask_matches_image(np.shape(regions), np.shape(images))
    regions = np.asarray(regions, bool)
    images, cond, neg, rng = self._inputs(images, prompts, seed,
                                          negative_prompt)
    factor = self.size // self.base_size
    with self._scope():
      low = self._tokens(self.g.vq, downsample(images, factor))
      low_mask = jnp.asarray(editing.token_mask_from_pixels(
          downsample_mask(regions, factor), self.base_f))
      base = editing.inpaint(self.g.transformer, rng, cond, low, low_mask,
                             cfg=self.g.sampler, negative=neg)
      out = dict(base=base, source_base=low, base_region=low_mask)
      sr = self.g.superres
      if sr is not None:
        hr_mask = jnp.asarray(
            editing.token_mask_from_pixels(regions, self.sr_f))
        source_hr = self._tokens(sr.vq, images)
        out.update(source_hr=source_hr, hr_region=hr_mask, hr=editing.inpaint(
            sr.model, jax.random.fold_in(rng, 1),
            conditioning.LowRes(cond, base), source_hr, hr_mask,
            cfg=sr.sampler,
            negative=None if neg is None else conditioning.LowRes(neg, base)))
      return self._finish(out)

  def outpaint_batch(self, images: np.ndarray, keep: np.ndarray,
                     prompts: Sequence[str], *, seed: int = 0,
                     negative_prompt: str | Sequence[str] | None = None
                    ) -> Edited:
    """Images regenerated around the kept pixels (bool [B, S, S])."""
    keep = np.asarray(keep, bool)
    editing.check_mask_matches_image(keep.shape, np.shape(images))
    if keep.reshape(keep.shape[0], -1).all(axis=1).any():
      raise ValueError("outpaint: the kept region is the whole image")
    return self.inpaint_batch(images, ~keep, prompts, seed=seed,
                              negative_prompt=negative_prompt)

  def maskfree_batch(self, images: np.ndarray, prompts: Sequence[str], *,
                     seed: int = 0, iterations: int = 100,
                     fraction: float = 0.08, guidance_scale: float = 4.0,
                     top_k: int = 3,
                     negative_prompt: str | Sequence[str] | None = None,
                     intermediate_every: int = 0
                     ) -> tuple[Edited, list[np.ndarray]]:
    """(the edits, images [B, S, S, 3] after every `intermediate_every`-th
    iteration (base model's tokens through the cascade); [] when 0)."""
    images, cond, neg, rng = self._inputs(images, prompts, seed,
                                          negative_prompt)
    with self._scope():
      low = self._tokens(self.g.vq, downsample(
          images, self.size // self.base_size))
      out = editing.maskfree_edit(
          self.g.transformer, rng, cond, low, fraction=fraction,
          iterations=iterations, guidance_scale=guidance_scale, top_k=top_k,
          negative=neg, return_intermediate=intermediate_every > 0,
          intermediate_every=max(1, intermediate_every))
      base, steps = out if intermediate_every > 0 else (out, None)
      everything = jnp.ones(low.shape, bool)
      results = [self._images(self._superres(cond, neg, b, rng))
                 for b in ([] if steps is None else list(steps))]
      edited = self._superres(cond, neg, base, rng)
      edited.update(source_base=low, base_region=everything)
      if "hr" in edited:
        edited.update(source_hr=self._tokens(self.g.superres.vq, images),
                      hr_region=jnp.ones(edited["hr"].shape, bool))
      return self._finish(edited), results

  def _superres(self, cond, neg, base, rng) -> dict[str, jax.Array]:
    """The super-res model's high-res tokens decoded from `base`."""
    sr = self.g.superres
    out = dict(base=base)
    if sr is not None:
      out["hr"] = sampling.sample(
          sr.model, jax.random.fold_in(rng, 1),
          conditioning.LowRes(cond, base), cfg=sr.sampler,
          negative=None if neg is None else conditioning.LowRes(neg, base))
    return out

  def _images(self, out: dict[str, jax.Array]) -> np.ndarray:
    hr = out.get("hr")
    return self._decode(np.asarray(out["base"]),
                        None if hr is None else np.asarray(hr))

  def _finish(self, out: dict[str, jax.Array]) -> Edited:
    host = {k: np.asarray(v) for k, v in out.items()}
    return Edited(images=self._images(host), **host)

  # One image at a time.

  def inpaint(self, image: np.ndarray, region: np.ndarray, prompt: str, *,
              seed: int = 0, negative_prompt: str | None = None
              ) -> np.ndarray:
    """The image with the pixel `region` (bool [S, S]) regenerated."""
    self._check(np.asarray(image)[None], [prompt])
    editing.check_mask_matches_image(np.shape(region), np.shape(image))
    return self.inpaint_batch(
        np.asarray(image)[None], np.asarray(region)[None], [prompt],
        seed=seed, negative_prompt=negative_prompt).images[0]

  def outpaint(self, image: np.ndarray, keep: np.ndarray, prompt: str, *,
               seed: int = 0, negative_prompt: str | None = None
               ) -> np.ndarray:
    """The image regenerated around the kept pixels (bool [S, S])."""
    editing.check_mask_matches_image(np.shape(keep), np.shape(image))
    return self.outpaint_batch(
        np.asarray(image)[None], np.asarray(keep)[None], [prompt],
        seed=seed, negative_prompt=negative_prompt).images[0]

  def maskfree(self, image: np.ndarray, prompt: str, *, seed: int = 0,
               iterations: int = 100, fraction: float = 0.08,
               guidance_scale: float = 4.0, top_k: int = 3,
               negative_prompt: str | None = None,
               intermediate_every: int = 0
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(edited image, images after every `intermediate_every`-th
    iteration (base model's tokens through the cascade); [] when 0)."""
    edited, steps = self.maskfree_batch(
        np.asarray(image)[None], [prompt], seed=seed, iterations=iterations,
        fraction=fraction, guidance_scale=guidance_scale, top_k=top_k,
        negative_prompt=negative_prompt,
        intermediate_every=intermediate_every)
    return edited.images[0], [s[0] for s in steps]
