"""Tests of muse_jax.models.layers and its XLA:CPU kernels (cpu_kernels).

The kernels: mixed-precision products (`einsum_f32`) and the low-precision
attention core with its own backward pass. The layers: the plain path and
the `"xla_cpu"` path compute the same function of the same parameters.
"""

from __future__ import annotations

from flax import nnx
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import cpu_kernels
from muse_jax.models import layers

# pylint: disable=protected-access

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
  out = cpu_kernels.einsum_f32(eqn, a, b)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, jnp.einsum(eqn, a, b))


@pytest.mark.parametrize("eqn,shape_a,shape_b", CASES)
def test_bfloat16_values_and_gradients(eqn, shape_a, shape_b):
  a, b = _operands(shape_a, shape_b, jnp.bfloat16)
  out = cpu_kernels.einsum_f32(eqn, a, b)
  assert out.dtype == jnp.float32
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  ref = jnp.einsum(eqn, a32, b32)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  w = _weights(out.shape)
  grads = jax.grad(
      lambda a, b: jnp.sum(cpu_kernels.einsum_f32(eqn, a, b) * w),
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
  grad = jax.grad(lambda a, b: jnp.sum(cpu_kernels.einsum_f32(eqn, a, b)),
                  argnums=(0, 1))
  dots = _dot_operand_dtypes(jax.make_jaxpr(grad)(a, b).jaxpr)
  assert len(dots) == 3  # forward, and one per operand gradient.
  assert all(d == ("bfloat16", "bfloat16") for d in dots), dots


def test_contraction_summing_one_operand_falls_back():
  # "c" is summed within b alone: its gradient is not an einsum of a and
  # the cotangent, so the plain (autodiff) product is used.
  eqn = "ab,bc->a"
  assert not cpu_kernels._grads_are_einsums(eqn)
  a, b = _operands((3, 4), (4, 5), jnp.bfloat16)
  out = cpu_kernels.einsum_f32(eqn, a, b)
  assert out.dtype == jnp.float32
  ga, gb = jax.grad(lambda a, b: jnp.sum(cpu_kernels.einsum_f32(eqn, a, b)),
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
  grad = jax.grad(
      lambda a, b: jnp.sum(cpu_kernels.einsum_f32("...d,df->...f", a, b)),
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
  ref = lambda q, k, v: jnp.sum(cpu_kernels.attend(q, k, v, m) * w)
  new = lambda q, k, v: jnp.sum(
      cpu_kernels._attend_low_precision(q, k, v, m) * w)
  np.testing.assert_allclose(new(q, k, v), ref(q, k, v), rtol=1e-6)
  grads = jax.grad(new, argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  if mask is not None and not mask[1].any():
    out = cpu_kernels._attend_low_precision(q, k, v, m)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(grads[0][1], 0.0)


@pytest.mark.parametrize("mask", MASKS[:2])
def test_bfloat16_attention_values_gradients_and_products(mask):
  q, k, v, w = _qkv(seed=1)
  m = None if mask is None else jnp.asarray(mask)
  bf = lambda x: x.astype(jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(
      cpu_kernels.attend(q, k, v, m).astype(jnp.float32) * w)
  out = cpu_kernels.attend(bf(q), bf(k), bf(v), m)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32),
                             cpu_kernels.attend(q, k, v, m), rtol=3e-2,
                             atol=3e-2)
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


@pytest.mark.parametrize("mask", MASKS)
def test_attend_equals_plain_dot_product_attention(mask):
  # The kernel takes heads-major, pre-scaled queries; the plain path
  # [B, T, H, K] and scales itself. Rows with no valid key give zeros.
  q, k, v, _ = _qkv(seed=2)
  m = None if mask is None else jnp.asarray(mask)
  ref = layers.dot_product_attention(
      *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), m)
  got = cpu_kernels.attend(q * q.shape[-1]**-0.5, k, v, m)
  np.testing.assert_allclose(jnp.swapaxes(got, 1, 2), ref, rtol=1e-5,
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(ref))) > 0.1
  if mask is not None and not mask[1].any():
    np.testing.assert_array_equal(ref[1], 0.0)


# ---------------------------------------------------------------------------
# The plain and "xla_cpu" paths of the layers: one function, one set of
# parameters.
# ---------------------------------------------------------------------------

# Tolerance per compute dtype: rtol, and atol relative to the largest
# reference magnitude. bfloat16 has 8 significant bits; the paths round
# at different places (e.g. the xla_cpu bias is added before rounding).
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


def _perturb(module, seed):
  """Adds noise to every parameter (biases start at zero, hiding them)."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(module, jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(key, x.shape, x.dtype)
      for key, x in zip(keys, leaves)]))


def _plain_and_xla_cpu(make, seed=0):
  """`make(impl, rngs)` with impl "plain" and "xla_cpu", same parameters."""
  with nnx.use_eager_sharding(False):
    plain = make("plain", nnx.Rngs(seed))
    # Another seed, so that only the copy below makes the weights equal.
    fast = make("xla_cpu", nnx.Rngs(seed + 1))
  _perturb(plain, seed + 2)
  nnx.update(fast, nnx.state(plain))
  want, got = (nnx.to_pure_dict(nnx.state(m)) for m in (plain, fast))
  assert jax.tree.structure(want) == jax.tree.structure(got)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  return plain, fast


def _outputs_and_grads(module, call, inputs, w):
  """`call(module, *inputs)` and the gradients of sum(output * w).

  Returns (output, {param path: gradient}, input gradients).
  """
  graphdef, params = nnx.split(module)

  def loss(params, inputs):
    out = call(nnx.merge(graphdef, params), *inputs)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, out), (param_grads, input_grads) = grad(params, inputs)
  flat = {jax.tree_util.keystr(path): g for path, g in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(param_grads))}
  return out, flat, input_grads


def _jit_call(module, fn, *args):
  """`fn(module, *args)`, jitted."""
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args)


def _assert_close(got, want, dtype, what):
  """Close within TOLERANCE, atol relative to max |want|."""
  got, want = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, want))
  tol = TOLERANCE[dtype]
  scale = float(np.max(np.abs(want)))
  assert scale > 0, f"{what}: the reference is all zeros"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale,
                             err_msg=what)


def _check_same_function(plain, fast, call, inputs, dtype, seed=0,
                         zero_grads=()):
  """Values and gradients (params and inputs) of both paths agree.

  `zero_grads` names the parameters whose gradient is zero in exact
  arithmetic (see `ATTENTION_ZERO_GRADS`): each path computes rounding
  noise there, which must be small next to the largest gradient.
  """
  inputs = tuple(jnp.asarray(x, dtype) for x in inputs)
  shape = jax.eval_shape(lambda *a: call(plain, *a), *inputs).shape
  w = jax.random.normal(jax.random.key(seed + 7), shape)
  out_p, params_p, inputs_p = _outputs_and_grads(plain, call, inputs, w)
  out_f, params_f, inputs_f = _outputs_and_grads(fast, call, inputs, w)
  assert out_p.dtype == out_f.dtype == jnp.dtype(dtype)
  assert out_p.shape == out_f.shape
  _assert_close(out_f, out_p, dtype, "output")
  assert sorted(params_f) == sorted(params_p) and params_p
  largest = max(float(jnp.max(jnp.abs(g))) for g in params_p.values())
  for path, g in params_p.items():
    assert params_f[path].dtype == g.dtype == jnp.float32, path
    if path in zero_grads:
      for noise in (g, params_f[path]):
        assert float(jnp.max(jnp.abs(noise))) <= (
            TOLERANCE[dtype] * largest), path
    else:
      _assert_close(params_f[path], g, dtype, f"d/d{path}")
  for i, (g_f, g_p) in enumerate(zip(inputs_f, inputs_p)):
    assert g_f.dtype == g_p.dtype == jnp.dtype(dtype)
    _assert_close(g_f, g_p, dtype, f"d/dinput{i}")
  return out_p, out_f, inputs_p, inputs_f


DTYPES = ["float32", "bfloat16"]

# (equation, kernel shape, axes, Einsum keywords, input shape).
EINSUM_CASES = [
    ("btd,dhk->bthk", (8, 2, 4), ("embed", "heads", "kv"),
     dict(bias_ndim=2), (2, 5, 8)),
    # The MLP's flattened rows, whose bf16 weight gradient splits the rows.
    ("...d,df->...f", (8, 6), ("embed", "mlp"), {}, (6, 8)),
    ("bhtk,hkd->btd", (2, 4, 8), ("heads", "kv", "embed"),
     dict(fan_in_ndim=2), (2, 2, 5, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [None, 0.35])
@pytest.mark.parametrize("eqn,shape,axes,kw,x_shape", EINSUM_CASES,
                         ids=[c[0] for c in EINSUM_CASES])
def test_einsum_xla_cpu_equals_plain(eqn, shape, axes, kw, x_shape, scale,
                                     dtype):
  plain, fast = _plain_and_xla_cpu(
      lambda impl, rngs: layers.Einsum(eqn, shape, axes, rngs=rngs,
                                       use_bias=True, dtype=dtype, impl=impl,
                                       **kw))
  x = np.random.default_rng(3).normal(size=x_shape)
  call = lambda m, x: m(x, scale=scale)
  out, _, _, _ = _check_same_function(plain, fast, call, (x,), dtype)
  # The scale multiplies the whole output, bias included.
  unscaled = _jit_call(plain, lambda m, x: m(x), jnp.asarray(x, dtype))
  _assert_close(out, unscaled * (1.0 if scale is None else scale), dtype,
                "scaled output")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(2, 3, 8), (6, 8)])
def test_mlp_xla_cpu_equals_plain(x_shape, dtype):
  plain, fast = _plain_and_xla_cpu(
      lambda impl, rngs: layers.Mlp(8, 16, rngs=rngs, dtype=dtype, impl=impl))
  x = np.random.default_rng(4).normal(size=x_shape)
  _check_same_function(plain, fast, lambda m, x: m(x), (x,), dtype)


# The key bias adds the same q . b to every score of a query, which the
# softmax ignores: its gradient is exactly zero.
ATTENTION_ZERO_GRADS = ("['key']['bias']",)


def _attention_pair(dtype, context_features=None, **kw):
  return _plain_and_xla_cpu(
      lambda impl, rngs: layers.Attention(
          16, 2, rngs=rngs, context_features=context_features, dtype=dtype,
          impl=impl, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention_xla_cpu_equals_plain(dtype):
  plain, fast = _attention_pair(dtype)
  x = np.random.default_rng(5).normal(size=(2, 5, 16))
  _check_same_function(plain, fast, lambda m, x: m(x), (x,), dtype,
                       zero_grads=ATTENTION_ZERO_GRADS)


# Row 1 has no valid key: a dropped caption.
CROSS_MASK = np.array([[1, 1, 0, 1, 0, 0, 1], [0] * 7], bool)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_xla_cpu_equals_plain(dtype):
  plain, fast = _attention_pair(dtype, context_features=12)
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 5, 16))
  context = rng.normal(size=(2, 7, 12))
  mask = jnp.asarray(CROSS_MASK)
  call = lambda m, x, c: m(x, c, mask)
  outs = _check_same_function(plain, fast, call, (x, context), dtype,
                              zero_grads=ATTENTION_ZERO_GRADS)
  out_p, out_f, grads_p, grads_f = outs
  # The row without keys gets the output bias only, and no gradient flows
  # into its query or its context.
  bias = jnp.broadcast_to(plain.out.bias[...].astype(dtype), out_p[1].shape)
  assert float(jnp.max(jnp.abs(bias.astype(jnp.float32)))) > 0.1
  for out in (out_p, out_f):
    np.testing.assert_array_equal(out[1], bias)
    assert not np.allclose(out[0].astype(jnp.float32),
                           bias.astype(jnp.float32))
  for grads in (grads_p, grads_f):
    for g in grads:
      np.testing.assert_array_equal(g[1], 0.0)
      assert float(jnp.max(jnp.abs(g[0].astype(jnp.float32)))) > 0
  # Masked keys are not attended: changing them changes nothing.
  changed = jnp.asarray(context).at[0, 2].set(50.0)
  for m in (plain, fast):
    a, b = _jit_call(m, lambda m, c1, c2: (m(x, c1, mask), m(x, c2, mask)),
                     changed, context)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", layers.IMPLS)
def test_cached_kv_layout_and_use(impl):
  with nnx.use_eager_sharding(False):
    attn = layers.Attention(16, 2, rngs=nnx.Rngs(0), context_features=12,
                            impl=impl)
  _perturb(attn, 1)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
  mask = jnp.asarray(CROSS_MASK)
  k, v = attn.kv(context)
  want = (2, 7, 2, 8) if impl == "plain" else (2, 2, 7, 8)  # heads-major
  assert k.shape == v.shape == want
  np.testing.assert_allclose(attn(x, mask=mask, cached_kv=(k, v)),
                             attn(x, context, mask), rtol=1e-6, atol=1e-6)


def test_attention_matmul_impl_is_separate():
  # The xla_cpu attention core with plain projections (and the reverse)
  # is still the same function.
  x = np.random.default_rng(8).normal(size=(2, 5, 16))
  for impl, matmul_impl in [("xla_cpu", "plain"), ("plain", "xla_cpu")]:
    def make(which, rngs, impl=impl, matmul_impl=matmul_impl):
      if which == "plain":
        return layers.Attention(16, 2, rngs=rngs)
      return layers.Attention(16, 2, rngs=rngs, impl=impl,
                              matmul_impl=matmul_impl)
    plain, fast = _plain_and_xla_cpu(make)
    assert fast.impl == impl and fast.query.impl == matmul_impl
    _check_same_function(plain, fast, lambda m, x: m(x), (x,), "float32",
                         zero_grads=ATTENTION_ZERO_GRADS)


@pytest.mark.parametrize("make", [
    lambda impl: layers.Einsum("...d,df->...f", (4, 4), ("embed", "mlp"),
                               rngs=nnx.Rngs(0), impl=impl),
    lambda impl: layers.Mlp(4, 8, rngs=nnx.Rngs(0), impl=impl),
    lambda impl: layers.Attention(4, 2, rngs=nnx.Rngs(0), impl=impl),
    lambda impl: layers.Attention(4, 2, rngs=nnx.Rngs(0), matmul_impl=impl),
], ids=["einsum", "mlp", "attention", "attention_matmul"])
def test_unknown_impl_raises_naming_it(make):
  with nnx.use_eager_sharding(False):
    with pytest.raises(ValueError, match=r"impl='xla_gpu' not in"):
      make("xla_gpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_attention_xla_cpu_equals_plain(dtype):
  plain, fast = _attention_pair(dtype, context_features=12, qk_norm=True)
  assert plain.query_norm is not None and plain.key_norm is not None
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 5, 16))
  context = rng.normal(size=(2, 7, 12))
  mask = jnp.asarray(CROSS_MASK)
  # The key norm makes the key bias matter: no gradient is zero.
  _check_same_function(plain, fast, lambda m, x, c: m(x, c, mask),
                       (x, context), dtype)


def test_qk_norm_bounds_the_logits():
  """Scaling the query projection by 1000 leaves qk-normed outputs alone."""
  with nnx.use_eager_sharding(False):
    attn = layers.Attention(16, 2, rngs=nnx.Rngs(0), qk_norm=True)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, 16)),
                  jnp.float32)
  before = attn(x)
  attn.query.kernel[...] = attn.query.kernel[...] * 1000.0
  attn.query.bias[...] = attn.query.bias[...] * 1000.0
  np.testing.assert_allclose(attn(x), before, atol=1e-4)
