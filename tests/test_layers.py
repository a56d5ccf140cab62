"""Mixed-precision products of muse_jax.models.layers (`einsum_f32`) and
the low-precision attention core with its own backward pass."""

from __future__ import annotations

from flax import nnx
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import layers

# (equation, operand shapes): the layers' projections, with and without
# ellipsis, heads-major outputs and the attention's batched products.
CASES = [
    ("...d,df->...f", (2, 3, 8), (8, 6)),
    ("...d,df->...f", (6, 8), (8, 5)),  # The MLP's rows, [B*T, D].
    ("btd,dhk->bhtk", (2, 5, 8), (8, 2, 4)),
    ("bhtk,hkd->btd", (2, 2, 5, 4), (2, 4, 8)),
    ("bhtk,bhsk->bhts", (2, 2, 5, 4), (2, 2, 3, 4)),
    ("bhts,bhsk->bhtk", (2, 2, 5, 3), (2, 2, 3, 4)),
]


def _operands(shape_a, shape_b, dtype, seed=0):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.normal(size=shape_a), dtype)
  b = jnp.asarray(rng.normal(size=shape_b), dtype)
  return a, b


def _weights(shape, seed=1):
  # bfloat16-representable, so rounding the cotangent to bf16 is exact.
  w = np.random.default_rng(seed).normal(size=shape)
  return jnp.asarray(w, jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("eqn,shape_a,shape_b", CASES)
def test_float32_is_the_plain_einsum(eqn, shape_a, shape_b):
  a, b = _operands(shape_a, shape_b, jnp.float32)
  out = layers.einsum_f32(eqn, a, b)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, jnp.einsum(eqn, a, b))


@pytest.mark.parametrize("eqn,shape_a,shape_b", CASES)
def test_bfloat16_values_and_gradients(eqn, shape_a, shape_b):
  a, b = _operands(shape_a, shape_b, jnp.bfloat16)
  out = layers.einsum_f32(eqn, a, b)
  assert out.dtype == jnp.float32
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  ref = jnp.einsum(eqn, a32, b32)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  w = _weights(out.shape)
  grads = jax.grad(lambda a, b: jnp.sum(layers.einsum_f32(eqn, a, b) * w),
                   argnums=(0, 1))(a, b)
  ref_grads = jax.grad(lambda a, b: jnp.sum(jnp.einsum(eqn, a, b) * w),
                       argnums=(0, 1))(a32, b32)
  for g, r, x in zip(grads, ref_grads, (a, b)):
    assert g.dtype == x.dtype == jnp.bfloat16
    assert g.shape == x.shape
    # The exact gradient, rounded once to bfloat16.
    np.testing.assert_allclose(g.astype(jnp.float32),
                               r.astype(jnp.bfloat16).astype(jnp.float32),
                               rtol=1e-2, atol=1e-2)


def _dots(jaxpr) -> list:
  """Every dot_general equation in `jaxpr` and its sub-jaxprs, in order."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for param in eqn.params.values():
      sub = getattr(param, "jaxpr", param)
      if isinstance(sub, jax_core.Jaxpr):
        found.extend(_dots(sub))
  return found


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
  """Operand dtypes of every dot_general in `jaxpr` and its sub-jaxprs."""
  return [tuple(str(v.aval.dtype) for v in eqn.invars)
          for eqn in _dots(jaxpr)]


@pytest.mark.parametrize("eqn,shape_a,shape_b", CASES[:3])
def test_backward_products_take_bfloat16_operands(eqn, shape_a, shape_b):
  # The point of the custom gradient: autodiff of a float32-output product
  # would multiply the float32 cotangent by an upcast operand.
  a, b = _operands(shape_a, shape_b, jnp.bfloat16)
  grad = jax.grad(lambda a, b: jnp.sum(layers.einsum_f32(eqn, a, b)),
                  argnums=(0, 1))
  dots = _dot_operand_dtypes(jax.make_jaxpr(grad)(a, b).jaxpr)
  assert len(dots) == 3  # forward, and one per operand gradient.
  assert all(d == ("bfloat16", "bfloat16") for d in dots), dots


def test_contraction_summing_one_operand_falls_back():
  # "c" is summed within b alone: its gradient is not an einsum of a and
  # the cotangent, so the plain (autodiff) product is used.
  eqn = "ab,bc->a"
  assert not layers._grads_are_einsums(eqn)  # pylint: disable=protected-access
  a, b = _operands((3, 4), (4, 5), jnp.bfloat16)
  out = layers.einsum_f32(eqn, a, b)
  assert out.dtype == jnp.float32
  ga, gb = jax.grad(lambda a, b: jnp.sum(layers.einsum_f32(eqn, a, b)),
                    argnums=(0, 1))(a, b)
  assert ga.shape == a.shape and gb.shape == b.shape


def test_bias_axes_must_end_the_output():
  axes = ("embed", "heads", "kv")
  with nnx.use_eager_sharding(False):
    with pytest.raises(ValueError, match="must end the output"):
      layers.Einsum("btd,dhk->bhtk", (8, 2, 4), axes, rngs=nnx.Rngs(0),
                    use_bias=True, bias_ndim=2)
    # The same product without a bias, or with its bias axes last, is fine.
    layers.Einsum("btd,dhk->bhtk", (8, 2, 4), axes, rngs=nnx.Rngs(0))
    layers.Einsum("btd,dhk->bthk", (8, 2, 4), axes, rngs=nnx.Rngs(0),
                  use_bias=True, bias_ndim=2)


def _dot_contractions(jaxpr) -> list[int]:
  """How many axes each dot_general in `jaxpr` contracts."""
  return [len(eqn.params["dimension_numbers"][0][0]) for eqn in _dots(jaxpr)]


@pytest.mark.parametrize("rows,split", [(6, True), (5, False)])
def test_row_weight_gradient_contracts_two_axes(rows, split):
  # The weight gradient of 2-D rows contracts them as two axes (even row
  # count), which XLA:CPU runs in bf16; an odd count keeps the one axis.
  a, b = _operands((rows, 8), (8, 4), jnp.bfloat16)
  grad = jax.grad(lambda a, b: jnp.sum(layers.einsum_f32("...d,df->...f",
                                                         a, b)),
                  argnums=(0, 1))
  counts = _dot_contractions(jax.make_jaxpr(grad)(a, b).jaxpr)
  assert counts == [1, 1, 2 if split else 1], counts
  ga, gb = grad(a, b)
  ref_b = jnp.einsum("td,tf->df", a.astype(jnp.float32),
                     jnp.ones((rows, 4), jnp.float32))
  np.testing.assert_allclose(gb.astype(jnp.float32),
                             ref_b.astype(jnp.bfloat16).astype(jnp.float32),
                             rtol=1e-2, atol=1e-2)
  assert ga.shape == a.shape


def _qkv(b=2, h=3, t=5, s=7, k=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, h, t, k))
  key = jax.random.normal(ks[1], (b, h, s, k))
  v = jax.random.normal(ks[2], (b, h, s, k))
  w = jax.random.normal(ks[3], (b, h, t, k))
  return q, key, v, w


# Key masks [2, 7]: None; some keys valid; a row (a dropped caption) none.
MASKS = [None, np.array([[1, 1, 0, 1, 0, 0, 1], [0] * 7], bool),
         np.array([[1] * 7, [0, 0, 1, 0, 0, 0, 0]], bool)]


@pytest.mark.parametrize("mask", MASKS)
def test_attention_core_matches_autodiff_in_float32(mask):
  # The custom backward is exact math: in float32 it agrees with JAX's
  # differentiation of the reference attention.
  q, k, v, w = _qkv()
  m = None if mask is None else jnp.asarray(mask)
  ref = lambda q, k, v: jnp.sum(layers.attend(q, k, v, m) * w)
  new = lambda q, k, v: jnp.sum(
      layers._attend_low_precision(q, k, v, m) * w)  # pylint: disable=protected-access
  np.testing.assert_allclose(new(q, k, v), ref(q, k, v), rtol=1e-6)
  grads = jax.grad(new, argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  if mask is not None and not mask[1].any():
    out = layers._attend_low_precision(q, k, v, m)  # pylint: disable=protected-access
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(grads[0][1], 0.0)


@pytest.mark.parametrize("mask", MASKS[:2])
def test_bfloat16_attention_values_gradients_and_products(mask):
  q, k, v, w = _qkv(seed=1)
  m = None if mask is None else jnp.asarray(mask)
  bf = lambda x: x.astype(jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(
      layers.attend(q, k, v, m).astype(jnp.float32) * w)
  out = layers.attend(bf(q), bf(k), bf(v), m)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32),
                             layers.attend(q, k, v, m), rtol=3e-2, atol=3e-2)
  grad = jax.grad(loss, argnums=(0, 1, 2))
  grads = grad(bf(q), bf(k), bf(v))
  for g, r in zip(grads, grad(q, k, v)):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(r)))
    np.testing.assert_allclose(g.astype(jnp.float32), r, rtol=0,
                               atol=3e-2 * scale)
  # Forward, recomputed scores, and the four backward products: all bf16.
  dots = _dot_operand_dtypes(jax.make_jaxpr(grad)(bf(q), bf(k), bf(v)).jaxpr)
  assert len(dots) == 7, dots
  assert all(d == ("bfloat16", "bfloat16") for d in dots), dots
