"""Multi-axis attention: image self-attention without T x T scores.

Full self-attention over a grid_h x grid_w grid of image tokens (T =
grid_h * grid_w) makes a [B, H, T, T] score tensor: for a 64 x 64 token grid
that is 4096**2 float32 scores, 64 MiB, per example and head, in every
layer. Multi-axis attention (Zhao et al. 2021, "Improved Transformer for
High-Resolution GANs"; Tu et al. 2022, MaxViT) splits the heads into two
halves, each attending within groups of window x window tokens:

* block (local) attention, the first half of the heads: the non-overlapping
  window x window squares of neighbouring tokens;
* grid (dilated global) attention, the second half: the window x window
  tokens spread over the whole image at stride (grid_h / window,
  grid_w / window). Token (row, col) is in the group of
  (row mod grid_h / window, col mod grid_w / window).

A query thus meets window**2 keys rather than T (64 rather than 4096 for a
64 x 64 grid with window 8), and the scores shrink by T / window**2, while
the grid half still mixes information across the whole image in one layer.
When the window covers the whole grid, each half has one group, the whole
image in raster order, and is exactly full attention.

The groups are formed with reshapes and transposes only (no gathers) and
folded into the batch, so each is attended by an ordinary attention core:
`jax.nn.dot_product_attention` by default, as `layers.dot_product_attention`
(unscaled queries, scaled by K**-0.5 inside; float32 scores and softmax).
No parameters are involved: `layers.Attention(multi_axis=...)` uses the
same projections as full attention, so a checkpoint serves either.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# How `_split` views the token axis of [B, T, h, K]: "block" as [B,
# groups_h, window, groups_w, window, h, K] (a group is a square of
# neighbours), "grid" as [B, window, groups_h, window, groups_w, h, K] (a
# group is the tokens with equal (row mod groups_h, col mod groups_w)). The
# first permutation takes either to [B, groups_h, groups_w, window, window,
# h, K]; the second is its inverse.
_PERMUTATIONS = {
    "block": ((0, 1, 3, 2, 4, 5, 6), (0, 1, 3, 2, 4, 5, 6)),
    "grid": ((0, 2, 4, 1, 3, 5, 6), (0, 3, 1, 4, 2, 5, 6)),
}

AttentionCore = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def check(grid: tuple[int, int], window: int, num_heads: int) -> None:
  """Raises ValueError unless multi-axis attention can run with these."""
  grid_h, grid_w = grid
  if window < 1 or grid_h < 1 or grid_w < 1:
    raise ValueError(f"multi-axis attention: grid {grid_h}x{grid_w} and "
                     f"window={window} must be >= 1")
  if grid_h % window or grid_w % window:
    raise ValueError(f"multi-axis attention: grid {grid_h}x{grid_w} is not "
                     f"divisible by window={window}")
  if num_heads % 2:
    raise ValueError(f"multi-axis attention: num_heads={num_heads} must be "
                     "even (half the heads attend locally, half globally)")


def _split(x: jax.Array, grid: tuple[int, int], window: int,
           kind: str) -> jax.Array:
  """[B, T, h, K] -> [B * groups, window**2, h, K], each group in order."""
  b, _, h, k = x.shape
  groups_h, groups_w = grid[0] // window, grid[1] // window
  if kind == "block":
    x = x.reshape(b, groups_h, window, groups_w, window, h, k)
  else:
    x = x.reshape(b, window, groups_h, window, groups_w, h, k)
  x = x.transpose(_PERMUTATIONS[kind][0])
  return x.reshape(b * groups_h * groups_w, window * window, h, k)


def _merge(x: jax.Array, grid: tuple[int, int], window: int,
           kind: str) -> jax.Array:
  """The inverse of `_split`: back to [B, T, h, K] in raster order."""
  _, _, h, k = x.shape
  groups_h, groups_w = grid[0] // window, grid[1] // window
  x = x.reshape(-1, groups_h, groups_w, window, window, h, k)
  x = x.transpose(_PERMUTATIONS[kind][1])
  return x.reshape(x.shape[0], grid[0] * grid[1], h, k)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           grid: tuple[int, int], window: int,
           mask: jax.Array | None = None,
           core: AttentionCore | None = None) -> jax.Array:
  """Multi-axis self-attention on [B, T, H, K], T = grid_h * grid_w.

  Tokens are in raster (row-major) order. Heads [0, H/2) attend within
  window x window blocks, heads [H/2, H) within the dilated grid groups
  (see the module docstring). `core(q, k, v)` attends each group,
  [B', window**2, H/2, K] -> same; by default `jax.nn.dot_product_attention`
  (it scales the queries, as the plain path of `layers.Attention`).
  `mask` must be None: every image token is a valid key. Returns
  [B, T, H, K].
  """
  if mask is not None:
    raise ValueError("multi-axis attention is self-attention over image "
                     "tokens and takes no key mask")
  if not q.shape == k.shape == v.shape or q.ndim != 4:
    raise ValueError("multi-axis attention: q, k, v must share one "
                     f"[B, T, H, K] shape, got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  grid_h, grid_w = grid
  check(grid, window, q.shape[2])
  if q.shape[1] != grid_h * grid_w:
    raise ValueError(f"multi-axis attention: sequence length {q.shape[1]} "
                     f"!= {grid_h * grid_w} tokens of the {grid_h}x{grid_w} "
                     "grid")
  core = core or jax.nn.dot_product_attention
  half = q.shape[2] // 2
  outs = []
  for heads, kind in ((slice(None, half), "block"),
                      (slice(half, None), "grid")):
    groups = [_split(x[:, :, heads], grid, window, kind) for x in (q, k, v)]
    outs.append(_merge(core(*groups), grid, window, kind))
  return jnp.concatenate(outs, axis=2)
