"""Tests of multi-axis attention (muse_jax.models.multi_axis).

The function against masked full attention, its locality, the option of
`layers.Attention` and `TransformerConfig`, bad configurations, and the
memory it saves on a 64 x 64 token grid.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import conditioning
from muse_jax.models import layers
from muse_jax.models import multi_axis
from muse_jax.models import transformer as tr


def _qkv(grid, heads=4, head_dim=8, batch=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, grid[0] * grid[1], heads, head_dim)
  return tuple(jax.random.normal(key, shape) for key in keys)


def _max_abs(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def _groups(grid, window):
  """Block and grid group ids [T] of the raster-order tokens."""
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  groups_h, groups_w = grid[0] // window, grid[1] // window
  block = (rows // window) * groups_w + cols // window
  dilated = (rows % groups_h) * groups_w + cols % groups_w
  return block, dilated


@pytest.mark.parametrize("grid", [(4, 4), (8, 8)])
def test_equals_full_attention_when_the_window_covers_the_grid(grid):
  q, k, v = _qkv(grid)
  got = multi_axis.attend(q, k, v, grid=grid, window=grid[0])
  assert got.shape == q.shape and got.dtype == jnp.float32
  assert _max_abs(got, layers.dot_product_attention(q, k, v)) < 1e-5


@pytest.mark.parametrize("grid,window", [((8, 8), 4), ((8, 12), 4),
                                         ((6, 4), 2)])
def test_equals_full_attention_masked_to_the_groups(grid, window):
  # The definition: heads [0, H/2) see their block, heads [H/2, H) the
  # tokens with equal (row mod grid_h/window, col mod grid_w/window).
  q, k, v = _qkv(grid, seed=1)
  block, dilated = _groups(grid, window)
  half = q.shape[2] // 2
  allowed = np.stack([block[:, None] == block[None, :]] * half
                     + [dilated[:, None] == dilated[None, :]] * half)
  assert allowed.sum(-1).min() == allowed.sum(-1).max() == window**2
  want = jax.nn.dot_product_attention(q, k, v, mask=allowed[None])
  got = multi_axis.attend(q, k, v, grid=grid, window=window)
  assert _max_abs(got, want) < 1e-5


def test_locality():
  grid, window = (8, 8), 4  # Blocks of 4 x 4; grid groups at stride 2.
  q, k, v = _qkv(grid, seed=2)
  token = lambda row, col: row * grid[1] + col
  query = token(1, 2)  # Block (0, 0); grid group (1, 0).

  def query_output_after_perturbing(row, col):
    i = token(row, col)
    k2, v2 = k.at[:, i].add(1.0), v.at[:, i].add(1.0)
    out = multi_axis.attend(q, k2, v2, grid=grid, window=window)
    return out[:, query]

  base = multi_axis.attend(q, k, v, grid=grid, window=window)[:, query]
  local, dilated = slice(None, 2), slice(2, None)
  # Another block and another grid group (residues (0, 1)): no effect.
  out = query_output_after_perturbing(6, 7)
  assert _max_abs(out, base) < 1e-6
  # The query's block, another grid group: only the block heads change.
  out = query_output_after_perturbing(0, 0)
  assert _max_abs(out[:, local], base[:, local]) > 1e-3
  assert _max_abs(out[:, dilated], base[:, dilated]) < 1e-6
  # The query's grid group, another block: only the grid heads change.
  out = query_output_after_perturbing(5, 6)
  assert _max_abs(out[:, local], base[:, local]) < 1e-6
  assert _max_abs(out[:, dilated], base[:, dilated]) > 1e-3


def _attention(seed=0, **kw):
  with nnx.use_eager_sharding(False):
    return layers.Attention(16, 4, rngs=nnx.Rngs(seed), **kw)


def _same_params(make_a, make_b):
  """Two modules, the second given the first's (perturbed) parameters."""
  a, b = make_a(0), make_b(1)
  state = nnx.state(a, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  # Noise on every parameter: biases and norm scales start constant.
  nnx.update(a, jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(key, x.shape, x.dtype)
      for key, x in zip(keys, leaves)]))
  nnx.update(b, nnx.state(a))
  want, got = (nnx.to_pure_dict(nnx.state(m)) for m in (a, b))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  return a, b


def _call(module, *args, fn=lambda m, *a: m(*a)):
  """`fn(module, *args)`, jitted."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


@pytest.mark.parametrize("impl", ["plain", "xla_cpu"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_layer(impl, qk_norm):
  grid = (4, 4)
  full, covering = _same_params(
      lambda seed: _attention(seed, impl=impl, qk_norm=qk_norm),
      lambda seed: _attention(seed, impl=impl, qk_norm=qk_norm,
                              multi_axis=(*grid, 4)))
  windowed = _attention(2, impl=impl, qk_norm=qk_norm, multi_axis=(*grid, 2))
  nnx.update(windowed, nnx.state(full))
  x = jax.random.normal(jax.random.key(3), (2, 16, 16))
  want = _call(full, x)
  assert _max_abs(_call(covering, x), want) < 1e-5
  # Cross-attention is full attention whatever the option.
  context = jax.random.normal(jax.random.key(4), (2, 5, 16))
  mask = jnp.asarray([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]], bool)
  assert _max_abs(_call(windowed, x, context, mask),
                  _call(full, x, context, mask)) < 1e-6
  # Self-attention with window 2 < 4 differs from full, and matches the
  # function on the layer's own projections.
  out = _call(windowed, x)
  assert _max_abs(out, want) > 1e-3
  if impl == "plain":
    graphdef, state = nnx.split(windowed)

    def reference(state, x):
      m = nnx.merge(graphdef, state)
      q, (k, v) = m.query(x), m.kv(x)
      if m.query_norm is not None:
        q = m.query_norm(q)
      return m.out(multi_axis.attend(q, k, v, grid=grid, window=2))

    assert _max_abs(out, jax.jit(reference)(state, x)) < 1e-6
  # A token outside a query's block and grid group does not reach it.
  query, far = 0, 3 * 4 + 3  # (0, 0) and (3, 3): other block, group (1, 1).
  moved = _call(windowed, x.at[:, far].add(1.0))
  assert _max_abs(moved[:, query], out[:, query]) < 1e-6
  near = _call(windowed, x.at[:, 1].add(1.0))  # (0, 1): the same block.
  assert _max_abs(near[:, query], out[:, query]) > 1e-3


def test_xla_cpu_equals_plain():
  make = lambda impl: lambda seed: _attention(seed, impl=impl,
                                              multi_axis=(4, 4, 2))
  plain, fast = _same_params(make("plain"), make("xla_cpu"))
  x = jax.random.normal(jax.random.key(5), (2, 16, 16))
  assert _max_abs(_call(fast, x), _call(plain, x)) < 1e-5


def _tiny_cfg(**overrides) -> tr.TransformerConfig:
  kw = dict(codebook_size=16, grid_size=4, text_dim=8, width=16, depth=2,
            num_heads=2, mlp_dim=32)
  kw.update(overrides)
  return tr.TransformerConfig(**kw)


def _transformer(cfg, seed):
  with nnx.use_eager_sharding(False):
    return tr.MaskedTransformer(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(qk_norm="all", attention_impl="xla_cpu", matmul_impl="xla_cpu"),
])
def test_masked_transformer_covering_window_is_full_attention(overrides):
  cfg = _tiny_cfg(**overrides)
  assert cfg.self_attention == "full" and cfg.multi_axis is None
  full, covering = _same_params(
      lambda seed: _transformer(cfg, seed),
      lambda seed: _transformer(
          _tiny_cfg(self_attention="multi_axis", attention_window=4,
                    **overrides), seed))
  windowed = _transformer(
      _tiny_cfg(self_attention="multi_axis", attention_window=2, **overrides),
      2)
  nnx.update(windowed, nnx.state(full))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 17, (2, 16)), jnp.int32)
  text = conditioning.Text(
      jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32),
      jnp.ones((2, 5), bool))
  call = lambda m: _call(m, tokens, text,
                         fn=lambda m, tokens, text: m(tokens, m.context(text)))
  want = call(full)
  assert want.shape == (2, 16, 16)
  assert _max_abs(call(covering), want) < 1e-5
  assert _max_abs(call(windowed), want) > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(6, 8), window=4), r"grid 6x8 is not divisible by window=4"),
    (dict(grid=(4, 4), window=0), r"window=0 must be >= 1"),
    (dict(grid=(4, 4), window=2, heads=3), r"num_heads=3 must be even"),
    (dict(grid=(4, 4), window=2, length=15), r"sequence length 15 != 16"),
    (dict(grid=(4, 4), window=2, mask=True), r"takes no key mask"),
])
def test_attend_rejects(kwargs, match):
  grid, window = kwargs["grid"], kwargs["window"]
  q, k, v = _qkv(grid if "length" not in kwargs else (1, kwargs["length"]),
                 heads=kwargs.get("heads", 4))
  mask = jnp.ones(q.shape[:2], bool) if kwargs.get("mask") else None
  with pytest.raises(ValueError, match=match):
    multi_axis.attend(q, k, v, grid=grid, window=window, mask=mask)


def test_attend_rejects_unequal_shapes():
  q, k, v = _qkv((4, 4))
  with pytest.raises(ValueError, match=r"share one \[B, T, H, K\] shape"):
    multi_axis.attend(q, k[:, :8], v[:, :8], grid=(4, 4), window=2)


def test_attention_layer_rejects_bad_options():
  with pytest.raises(ValueError, match=r"grid 4x6 is not divisible by "
                     r"window=4"):
    _attention(multi_axis=(4, 6, 4))
  with nnx.use_eager_sharding(False), pytest.raises(
      ValueError, match=r"num_heads=3 must be even"):
    layers.Attention(12, 3, rngs=nnx.Rngs(0), multi_axis=(4, 4, 2))
  attn = _attention(multi_axis=(4, 4, 2))
  x = jnp.ones((1, 16, 16))
  with pytest.raises(ValueError, match=r"takes no key mask"):
    attn(x, mask=jnp.ones((1, 16), bool))
  with pytest.raises(ValueError, match=r"sequence length 9 != 16"):
    attn(jnp.ones((1, 9, 16)))


@pytest.mark.parametrize("overrides,match", [
    (dict(self_attention="axial"), r"self_attention='axial' not in"),
    (dict(attention_window=0), r"attention_window must be >= 1, got 0"),
    (dict(self_attention="multi_axis", attention_window=3),
     r"grid_size=4 is not divisible by attention_window=3"),
    (dict(self_attention="multi_axis", attention_window=2, num_heads=1),
     r"num_heads=1 must be even for self_attention='multi_axis'"),
])
def test_config_rejects(overrides, match):
  with pytest.raises(ValueError, match=rf"TransformerConfig\.{match}"):
    _tiny_cfg(**overrides)


def test_full_attention_ignores_the_window():
  # The default window (8) need not divide the grid unless it is used.
  cfg = _tiny_cfg(attention_window=3)
  assert cfg.multi_axis is None
  assert _tiny_cfg(self_attention="multi_axis",
                   attention_window=2).multi_axis == (4, 4, 2)


def _temp_bytes(module, x) -> int:
  """XLA's temporary memory for a compiled forward of `module` on `x`."""
  graphdef, state = nnx.split(module)
  f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return f.lower(state, x).compile().memory_analysis().temp_size_in_bytes


def test_memory_on_a_64x64_grid():
  # One [1, 4, 4096, 4096] float32 score tensor is 256 MiB; multi-axis
  # attention's are [64, 2, 64, 64] per half, 2 MiB.
  x = jax.ShapeDtypeStruct((1, 64 * 64, 64), jnp.float32)
  with nnx.use_eager_sharding(False):
    full = layers.Attention(64, 4, rngs=nnx.Rngs(0))
    windowed = layers.Attention(64, 4, rngs=nnx.Rngs(0),
                                multi_axis=(64, 64, 8))
  full_bytes, windowed_bytes = _temp_bytes(full, x), _temp_bytes(windowed, x)
  print(f"temp memory, 64x64 grid self-attention: full {full_bytes} B, "
        f"multi-axis {windowed_bytes} B ({full_bytes / windowed_bytes:.1f}x)")
  assert full_bytes >= 256 * 2**20
  assert windowed_bytes * 10 <= full_bytes
