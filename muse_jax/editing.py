"""Zero-shot image editing with a trained Muse transformer (P§3.3).

Muse edits images without any fine-tuning: an image is tokenized by the VQ
tokenizer, some of its tokens are replaced by [MASK], and the masked
transformer fills them in, conditioned on a text prompt and on every token
left in place. Three edits follow from that:

* **Inpainting** (`inpaint`): the tokens inside a region are regenerated;
  every other token is returned unchanged (bitwise). It is the parallel
  decoder (`sampling.sample`) started from the source tokens with [MASK]
  inside the region, so the regenerated tokens follow the decoder's cosine
  schedule and classifier-free guidance exactly as generation does.
* **Outpainting** (`outpaint`): the same with the region *outside* a kept
  part of the image regenerated (e.g. extending a picture around a box).
* **Mask-free editing** (`maskfree_edit`): no region at all. Starting from
  the source tokens, each iteration re-masks a small random subset of them
  (8% in the paper) and resamples it in one guided forward pass (guidance 4,
  top-k 3 in the paper), keeping the rest; over ~100 iterations the image
  drifts towards the prompt while keeping the source's overall layout.

Editing regions are usually given in pixels: `box_mask` builds a pixel mask
from a box, `check_mask_matches_image` checks it against the image, and
`token_mask_from_pixels` maps it onto the token grid (a token is regenerated
when *any* pixel of its f x f patch is in the region, so the region is never
shrunk). The VQ decoder's receptive field spans several tokens, so pixels
near the region's border can change slightly even though the tokens outside
it are kept; callers who need the untouched pixels bitwise composite them
back (`where(pixel_mask, edited, source)`).

Token order is row-major over the token grid (index = row * grid + column),
the order the tokenizer's [B, grid, grid] token maps flatten to.

Randomness of `maskfree_edit` is drawn per row: iteration i of row r uses
`fold_in(fold_in(rng, i), r)`, so a row's result depends only on the key,
its row index and its own inputs, never on the rest of the batch.
`inpaint`/`outpaint` inherit `sampling.sample`'s draws, which are uniform
arrays of shape [B, N]; with JAX's partitionable threefry (the default
since JAX 0.5) element (r, j) of such an array depends on the key and r*N+j
only, so a row's result does not depend on the batch size either.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import sampling
from muse_jax.models import conditioning
from muse_jax.models.transformer import MaskedTransformer


# ---------------------------------------------------------------------------
# Pixel regions -> token masks.
# ---------------------------------------------------------------------------


def box_mask(height: int, width: int,
             box: tuple[int, int, int, int]) -> np.ndarray:
  """Boolean pixel mask [height, width], True inside `box`.

  Args:
    height, width: the image's size in pixels.
    box: (top, left, bottom, right) pixel coordinates; top/left inclusive,
      bottom/right exclusive (Python slice convention).

  Raises:
    ValueError: if the image size is not positive, the box does not have
      four integer coordinates, lies (partly) outside the image, or is
      empty.
  """
  if height < 1 or width < 1:
    raise ValueError(f"box_mask: image size {height}x{width} must be "
                     "positive")
  if len(box) != 4 or not all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool)
      for v in box):
    raise ValueError(f"box_mask: box must be four integers (top, left, "
                     f"bottom, right), got {box!r}")
  top, left, bottom, right = (int(v) for v in box)
  if top < 0 or left < 0 or bottom > height or right > width:
    raise ValueError(
        f"box_mask: box (top={top}, left={left}, bottom={bottom}, "
        f"right={right}) lies outside the {height}x{width} image "
        f"(rows 0..{height}, columns 0..{width})")
  if bottom <= top or right <= left:
    raise ValueError(
        f"box_mask: box (top={top}, left={left}, bottom={bottom}, "
        f"right={right}) is empty (needs bottom > top and right > left)")
  mask = np.zeros((height, width), bool)
  mask[top:bottom, left:right] = True
  return mask


def check_mask_matches_image(mask_shape: Sequence[int],
                             image_shape: Sequence[int]) -> None:
  """Raises ValueError unless a pixel mask fits an image.

  Args:
    mask_shape: the pixel mask's shape, [H, W] or [B, H, W].
    image_shape: the image's shape, [H, W, C] or [B, H, W, C].

  A mask [H, W] applies to every image of a batch; a batched mask must
  have the batch's size when the image is batched too.
  """
  mask_shape, image_shape = tuple(mask_shape), tuple(image_shape)
  if len(mask_shape) not in (2, 3):
    raise ValueError(f"pixel mask of shape {mask_shape} must be [H, W] or "
                     f"[B, H, W] (image of shape {image_shape})")
  if len(image_shape) not in (3, 4):
    raise ValueError(f"image of shape {image_shape} must be [H, W, C] or "
                     f"[B, H, W, C] (pixel mask of shape {mask_shape})")
  if mask_shape[-2:] != image_shape[-3:-1]:
    raise ValueError(
        f"pixel mask of shape {mask_shape} is {mask_shape[-2]}x"
        f"{mask_shape[-1]} pixels, the image of shape {image_shape} is "
        f"{image_shape[-3]}x{image_shape[-2]}")
  if (len(mask_shape) == 3 and len(image_shape) == 4
      and mask_shape[0] != image_shape[0]):
    raise ValueError(
        f"pixel mask of shape {mask_shape} has {mask_shape[0]} rows, the "
        f"image batch of shape {image_shape} has {image_shape[0]}")


def token_mask_from_pixels(pixel_mask, factor: int, *,
                           image_shape: Sequence[int] | None = None):
  """Maps a pixel mask onto the token grid of a tokenizer with stride f.

  Args:
    pixel_mask: bool [H, W] or [B, H, W], True on the pixels to regenerate
      (numpy or JAX; the result is of the same kind).
    factor: the tokenizer's downsampling factor f (pixels per token side).
    image_shape: optional shape of the image the mask is meant for
      ([H, W, C] or [B, H, W, C]); checked with `check_mask_matches_image`.

  Returns:
    bool [(B,) (H/f) * (W/f)] in row-major token order, True where any pixel
    of the token's f x f patch is True.

  Raises:
    ValueError: if H or W is not divisible by f, the mask is not 2-D or
      3-D, or it does not match `image_shape`.
  """
  if isinstance(factor, bool) or int(factor) != factor or factor < 1:
    raise ValueError(f"token_mask_from_pixels: factor must be a positive "
                     f"integer, got {factor!r}")
  factor = int(factor)
  xp = jnp if isinstance(pixel_mask, jax.Array) else np
  pixel_mask = xp.asarray(pixel_mask)
  if image_shape is not None:
    check_mask_matches_image(pixel_mask.shape, image_shape)
  if pixel_mask.ndim not in (2, 3):
    raise ValueError(f"token_mask_from_pixels: pixel mask of shape "
                     f"{pixel_mask.shape} must be [H, W] or [B, H, W]")
  *batch, height, width = pixel_mask.shape
  if height % factor or width % factor:
    raise ValueError(
        f"token_mask_from_pixels: pixel mask of {height}x{width} pixels "
        f"(shape {pixel_mask.shape}) is not divisible by the tokenizer's "
        f"factor {factor}")
  gh, gw = height // factor, width // factor
  patches = pixel_mask.astype(bool).reshape(*batch, gh, factor, gw, factor)
  return patches.any(axis=(-3, -1)).reshape(*batch, gh * gw)


# ---------------------------------------------------------------------------
# Inpainting and outpainting.
# ---------------------------------------------------------------------------


def _check_edit_inputs(model: MaskedTransformer, condition, tokens,
                       token_mask=None):
  """Validated (int32 tokens [B, N], bool token mask [B, N] or None)."""
  mcfg = model.cfg
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] != mcfg.seq_len:
    raise ValueError(f"tokens of shape {tokens.shape} must be [B, "
                     f"{mcfg.seq_len}] (the model's grid_size**2 tokens)")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer codebook ids, got dtype "
                     f"{tokens.dtype}")
  if tokens.shape[0] != condition.batch_size:
    raise ValueError(f"tokens have {tokens.shape[0]} rows, the condition "
                     f"{condition.batch_size}")
  tokens = tokens.astype(jnp.int32)
  if token_mask is None:
    return tokens, None
  token_mask = jnp.asarray(token_mask)
  if token_mask.dtype != jnp.bool_:
    raise ValueError(f"token mask must be boolean (True = regenerate), got "
                     f"dtype {token_mask.dtype}")
  if token_mask.shape not in (tokens.shape, tokens.shape[1:]):
    raise ValueError(f"token mask of shape {token_mask.shape} does not "
                     f"match the tokens of shape {tokens.shape} (it must be "
                     f"[N] or [B, N])")
  return tokens, jnp.broadcast_to(token_mask, tokens.shape)


def inpaint(
    model: MaskedTransformer,
    rng: jax.Array,
    condition: conditioning.Text,
    tokens: jax.Array,
    token_mask: jax.Array,
    *,
    cfg: sampling.SamplerConfig,
    negative: conditioning.Text | None = None,
) -> jax.Array:
  """Regenerates the tokens inside `token_mask`, keeping all others.

  Args:
    model: the masked transformer.
    rng: PRNG key; the same key gives the same result.
    condition: the text condition (batch B), as for `sampling.sample`.
    tokens: int [B, N] codebook ids of the source image (the VQ tokenizer's
      [B, grid, grid] map flattened row-major; no mask ids).
    token_mask: bool [B, N] or [N], True on the tokens to regenerate (e.g.
      `token_mask_from_pixels`). A row without True is returned as is.
    cfg: the parallel decoder's settings; its schedule runs over the masked
      tokens of each row.
    negative: optional negative prompt replacing the unconditional logits.

  Returns:
    int32 [B, N]: equal (bitwise) to `tokens` wherever `token_mask` is
    False, freshly decoded codebook ids wherever it is True.
  """
  tokens, token_mask = _check_edit_inputs(model, condition, tokens,
                                          token_mask)
  init = jnp.where(token_mask, model.cfg.mask_token_id, tokens)
  out = sampling.sample(model, rng, condition, cfg=cfg, init_tokens=init,
                        negative=negative)
  # The decoder never rewrites known tokens; selecting them from the source
  # makes the guarantee independent of its internals.
  return jnp.where(token_mask, out, tokens)


def outpaint(
    model: MaskedTransformer,
    rng: jax.Array,
    condition: conditioning.Text,
    tokens: jax.Array,
    keep_mask: jax.Array,
    *,
    cfg: sampling.SamplerConfig,
    negative: conditioning.Text | None = None,
) -> jax.Array:
  """Regenerates every token *outside* `keep_mask`, keeping those inside.

  The complement of `inpaint`: `keep_mask` (bool [B, N] or [N]) marks the
  tokens to keep; everything else is decoded anew around them. Same
  arguments and guarantees as `inpaint` otherwise.

  From a kept pixel region (e.g. `box_mask(H, W, box)`), map the region to
  *regenerate* onto tokens, `keep_mask = ~token_mask_from_pixels(~pixels,
  f)`, so that a token straddling the region's border is regenerated (as
  with inpainting) rather than kept.
  """
  keep_mask = jnp.asarray(keep_mask)
  if keep_mask.dtype != jnp.bool_:
    raise ValueError(f"keep mask must be boolean (True = keep), got dtype "
                     f"{keep_mask.dtype}")
  return inpaint(model, rng, condition, tokens, ~keep_mask, cfg=cfg,
                 negative=negative)


# ---------------------------------------------------------------------------
# Mask-free editing.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskFreeConfig:
  """Mask-free editing hyperparameters (static: part of the program).

  Attributes:
    fraction: share of the tokens re-masked and resampled per iteration;
      exactly `num_remasked(N)` = max(1, round(fraction * N)) of them
      (Python's round: halves go to the even integer).
    iterations: resampling iterations.
    guidance_scale: t in the guided logits (1 + t) * l_c - t * l_u
      (constant over iterations); 0 runs the conditional forward alone.
    top_k: sample among the k most likely tokens (0 = all of them).
    temperature: sampling temperature (> 0).
  """

  fraction: float = 0.08
  iterations: int = 100
  guidance_scale: float = 4.0
  top_k: int = 3
  temperature: float = 1.0

  def __post_init__(self):
    if not 0.0 < self.fraction <= 1.0:
      raise ValueError(f"maskfree_edit: fraction must be in (0, 1], got "
                       f"{self.fraction}")
    if self.iterations < 1:
      raise ValueError(f"maskfree_edit: iterations must be >= 1, got "
                       f"{self.iterations}")
    if self.guidance_scale < 0:
      raise ValueError(f"maskfree_edit: guidance_scale must be >= 0, got "
                       f"{self.guidance_scale}")
    if self.top_k < 0:
      raise ValueError(f"maskfree_edit: top_k must be >= 0, got "
                       f"{self.top_k}")
    if self.temperature <= 0:
      raise ValueError(f"maskfree_edit: temperature must be > 0, got "
                       f"{self.temperature}")

  def check_codebook(self, codebook_size: int) -> None:
    """Raises ValueError if `top_k` exceeds the model's codebook."""
    if self.top_k > codebook_size:
      raise ValueError(f"maskfree_edit: top_k={self.top_k} exceeds the "
                       f"codebook size {codebook_size}")

  def sampler(self) -> sampling.SamplerConfig:
    """The decoder settings with the same guidance (for `guidance_kv`)."""
    return sampling.SamplerConfig(
        num_steps=1, guidance_scale=self.guidance_scale,
        guidance_schedule="constant", temperature=self.temperature,
        top_k=self.top_k)

  def num_remasked(self, num_tokens: int) -> int:
    """Tokens re-masked per iteration in a row of `num_tokens`."""
    return min(num_tokens, max(1, round(self.fraction * num_tokens)))


def maskfree_edit(
    model: MaskedTransformer,
    rng: jax.Array,
    condition: conditioning.Text,
    tokens: jax.Array,
    *,
    fraction: float = 0.08,
    iterations: int = 100,
    guidance_scale: float = 4.0,
    top_k: int = 3,
    temperature: float = 1.0,
    negative: conditioning.Text | None = None,
    return_intermediate: bool = False,
    intermediate_every: int = 1,
):
  """Muse's mask-free editing: iterative resampling towards a prompt.

  Each iteration re-masks `max(1, round(fraction * N))` tokens of every row
  (a fresh uniformly random subset), runs one guided forward pass over the
  current tokens with those masked, and resamples them from the guided
  distribution (top-k filtered, then sampled at `temperature`); all other
  tokens are kept. The loop is one compiled program (a `lax.scan`).

  Args:
    model: the masked transformer.
    rng: PRNG key; the same key gives the same result. Row r's draws of
      iteration i come from fold_in(fold_in(rng, i), r): independent of
      the batch's other rows and of `return_intermediate`.
    condition: the text condition (batch B) to edit towards.
    tokens: int [B, N] codebook ids of the source image (no mask ids).
    fraction, iterations, guidance_scale, top_k, temperature: see
      `MaskFreeConfig` (the defaults are the paper's).
    negative: optional negative prompt replacing the unconditional logits.
    return_intermediate: also return the tokens after every
      `intermediate_every`-th iteration.
    intermediate_every: stride of the intermediate outputs: they are the
      tokens after iterations s, 2s, ..., floor(iterations / s) * s
      (1-based; s = intermediate_every), [iterations // s, B, N].

  Returns:
    int32 [B, N] edited tokens; with `return_intermediate`, the pair
    (tokens, intermediate [iterations // intermediate_every, B, N]).
  """
  cfg = MaskFreeConfig(fraction=fraction, iterations=iterations,
                       guidance_scale=guidance_scale, top_k=top_k,
                       temperature=temperature)
  cfg.check_codebook(model.cfg.codebook_size)
  if return_intermediate and not 1 <= intermediate_every <= iterations:
    raise ValueError(f"maskfree_edit: intermediate_every must be in [1, "
                     f"iterations={iterations}], got {intermediate_every}")
  tokens, _ = _check_edit_inputs(model, condition, tokens)
  every = intermediate_every if return_intermediate else None
  return _maskfree_edit(model, rng, condition, tokens, negative, cfg=cfg,
                        intermediate_every=every)


@functools.partial(jax.jit, static_argnames=("cfg", "intermediate_every"))
def _maskfree_edit(model, rng, condition, tokens, negative, *,
                   cfg: MaskFreeConfig, intermediate_every: int | None):
  """The compiled loop of `maskfree_edit` (intermediates when a stride)."""
  mask_id = model.cfg.mask_token_id
  batch, n = tokens.shape
  k = cfg.num_remasked(n)
  sampler = cfg.sampler()
  use_guidance = sampler.guided(negative is not None)
  kv = sampling.guidance_kv(model, sampler, condition, negative)
  rows = jnp.arange(batch)

  def iteration(i, tokens):
    step_key = jax.random.fold_in(rng, i)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
    split = jax.vmap(jax.random.split)(row_keys)  # [B, 2]
    pick_keys, draw_keys = split[:, 0], split[:, 1]
    # k distinct random positions per row: the k largest uniform scores.
    scores = jax.vmap(lambda key: jax.random.uniform(key, (n,)))(pick_keys)
    _, picked = jax.lax.top_k(scores, k)  # [B, k]
    masked = tokens.at[rows[:, None], picked].set(mask_id)
    inputs = jnp.concatenate([masked, masked]) if use_guidance else masked
    features = model.features(inputs, kv)
    if use_guidance:
      # Logits are affine in the features: guide them, then project once.
      cond, uncond = jnp.split(features.astype(jnp.float32), 2, axis=0)
      t = cfg.guidance_scale
      features = (1.0 + t) * cond - t * uncond
    # Only the k re-masked positions need logits.
    features = jnp.take_along_axis(features, picked[..., None], axis=1)
    logits = model.head_logits(features) / cfg.temperature
    if cfg.top_k:
      # pylint: disable-next=protected-access
      logits = sampling._top_k_filter(logits, cfg.top_k)
    drawn, _ = jax.vmap(sampling.sample_categorical)(draw_keys, logits)
    return tokens.at[rows[:, None], picked].set(drawn)

  def run(tokens, indices):
    """The iterations `indices` (1-D), in order, from `tokens`."""
    tokens, _ = jax.lax.scan(lambda t, i: (iteration(i, t), None), tokens,
                             indices)
    return tokens

  if intermediate_every is None:
    return run(tokens, jnp.arange(cfg.iterations))
  every = intermediate_every
  chunks = cfg.iterations // every

  def chunk(tokens, c):
    tokens = run(tokens, c * every + jnp.arange(every))
    return tokens, tokens

  tokens, intermediate = jax.lax.scan(chunk, tokens, jnp.arange(chunks))
  if cfg.iterations > chunks * every:
    tokens = run(tokens, jnp.arange(chunks * every, cfg.iterations))
  return tokens, intermediate
