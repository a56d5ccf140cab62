"""Transformer building blocks shared by the masked transformers and MiniLM.

Every parameter is annotated with *logical* axis names (see
`muse_jax.sharding.LOGICAL_AXES`); a rules table in the config maps them onto
mesh axes, so the same module code runs replicated on a laptop and FSDP/tensor
sharded on a pod. Parameters live in `param_dtype`; matmuls run in `dtype`;
layer norms and the attention softmax always run in float32, because bf16
statistics are where masked-token training goes unstable first.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | type

_NEG_INF = -1e9


def _init(initializer, axes: Sequence[str | None]):
  return nnx.with_partitioning(initializer, tuple(axes))


def _parse_einsum(eqn: str) -> tuple[str, str, str]:
  inputs, out = eqn.replace(" ", "").split("->")
  a, b = inputs.split(",")
  return a, b, out


def _grads_are_einsums(eqn: str) -> bool:
  """Whether both operand gradients are plain einsums of the other two."""
  a, b, out = _parse_einsum(eqn)
  letters = lambda s: set(s.replace("...", ""))
  return (letters(a) <= letters(b) | letters(out)
          and letters(b) <= letters(a) | letters(out)
          and ("..." not in a + b or "..." in out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32_out(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(eqn, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_out_fwd(eqn, a, b):
  return _einsum_f32_out(eqn, a, b), (a, b)


def _einsum_f32_out_bwd(eqn, residuals, g):
  a, b = residuals
  sa, sb, out = _parse_einsum(eqn)
  g = g.astype(a.dtype)
  da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


_einsum_f32_out.defvjp(_einsum_f32_out_fwd, _einsum_f32_out_bwd)


def einsum_f32(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum` of same-dtype operands, accumulated and returned in f32.

  For low-precision operands the backward products also take low-precision
  operands (the output cotangent is rounded to the operands' dtype), as
  mixed-precision training does everywhere: autodiff of a float32-output
  product would run both backward products in float32, which on CPUs with
  bf16 matrix units (AMX) is 3-4x slower.
  """
  if a.dtype == jnp.float32 or not _grads_are_einsums(eqn):
    return jnp.einsum(eqn, a, b, preferred_element_type=jnp.float32)
  return _einsum_f32_out(eqn, a, b)


class Einsum(nnx.Module):
  """A weight applied by an einsum, with an optional bias over output axes.

  `eqn` names the dimensions (e.g. "btd,dhk->bthk"); `shape` is the kernel
  shape and `axes` its logical axis names. The bias, when used, covers the
  trailing `bias_ndim` kernel dimensions, which must also end the output.
  """

  def __init__(
      self,
      eqn: str,
      shape: Sequence[int],
      axes: Sequence[str | None],
      *,
      rngs: nnx.Rngs,
      use_bias: bool = False,
      bias_ndim: int = 1,
      fan_in_ndim: int = 1,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      init_std: float | None = None,
  ):
    if len(shape) != len(axes):
      raise ValueError(f"Einsum {eqn!r}: shape {shape} vs axes {axes}")
    _, kernel_subs, out = _parse_einsum(eqn)
    if use_bias and not out.endswith(kernel_subs[-bias_ndim:]):
      raise ValueError(f"Einsum {eqn!r}: the bias axes "
                       f"{kernel_subs[-bias_ndim:]!r} must end the output")
    self.eqn = eqn
    self.dtype = dtype
    fan_in = math.prod(shape[:fan_in_ndim])
    std = init_std if init_std is not None else fan_in**-0.5
    init = nnx.initializers.truncated_normal(stddev=std)
    self.kernel = nnx.Param(
        _init(init, axes)(rngs.params(), tuple(shape), param_dtype)
    )
    self.bias = nnx.Param(
        _init(nnx.initializers.zeros_init(), axes[-bias_ndim:])(
            rngs.params(), tuple(shape[-bias_ndim:]), param_dtype
        )
    ) if use_bias else None

  def __call__(self, x: jax.Array, scale: float | None = None) -> jax.Array:
    """The einsum of `x` and the kernel, plus the bias; all times `scale`.

    The scale is folded into the weights (a kernel-sized multiply rather
    than an output-sized one).
    """
    kernel = self.kernel[...]
    if scale is not None:
      kernel = kernel * scale
    # Accumulate and add the bias in float32, then round once to `dtype`:
    # better numerics for bf16, and on CPUs with bf16 matrix units (AMX)
    # the bf16 x bf16 -> f32 product is the fast kernel (bf16 -> bf16 is not).
    y = einsum_f32(self.eqn, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.bias is not None:
      bias = self.bias[...]
      if scale is not None:
        bias = bias * scale
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """A lookup table [num, features] with logical axes (`table_axis`, embed)."""

  def __init__(
      self,
      num: int,
      features: int,
      *,
      rngs: nnx.Rngs,
      table_axis: str | None = "vocab",
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
      init_std: float = 0.02,
  ):
    self.dtype = dtype
    self.num = num
    init = nnx.initializers.truncated_normal(stddev=init_std)
    self.embedding = nnx.Param(
        _init(init, (table_axis, "embed"))(
            rngs.params(), (num, features), param_dtype
        )
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 and returned in `dtype`."""

  def __init__(
      self,
      features: int,
      *,
      rngs: nnx.Rngs,
      eps: float = 1e-6,
      use_bias: bool = True,
      axis_name: str = "embed",
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
  ):
    del rngs  # Deterministic init; the argument keeps constructors uniform.
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(
        _init(nnx.initializers.ones_init(), (axis_name,))(
            None, (features,), param_dtype
        )
    )
    self.bias = nnx.Param(
        _init(nnx.initializers.zeros_init(), (axis_name,))(
            None, (features,), param_dtype
        )
    ) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Mlp(nnx.Module):
  """Two-layer GELU MLP, d -> mlp -> d."""

  def __init__(
      self,
      features: int,
      hidden: int,
      *,
      rngs: nnx.Rngs,
      use_bias: bool = True,
      approximate_gelu: bool = True,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
  ):
    kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    self.approximate_gelu = approximate_gelu
    self.wi = Einsum("...d,df->...f", (features, hidden), ("embed", "mlp"), **kw)
    self.wo = Einsum("...f,fd->...d", (hidden, features), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.wi(x), approximate=self.approximate_gelu)
    return self.wo(h)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention of pre-scaled queries, heads-major [B, H, T|S, K].

  Scores, the softmax statistics and its normalisation are float32; the
  weighted sum of values runs in the values' dtype. The normalisation is
  applied to the [B, H, T, K] output rather than to the [B, H, T, S]
  weights: the score tensor is the largest one attention makes, and on
  memory-bound hardware every pass over it costs as much as the matmuls.
  `mask` [B, S] marks valid keys; a row with no valid key attends nothing
  (a dropped caption gives zeros, not an average of padding).
  """
  scores = einsum_f32("bhtk,bhsk->bhts", q, k)
  if mask is not None:
    scores = jnp.where(mask[:, None, None, :], scores, _NEG_INF)
  scores = scores - jnp.max(scores, axis=-1, keepdims=True)
  unnormalised = jnp.exp(scores)
  denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = einsum_f32("bhts,bhsk->bhtk", unnormalised.astype(v.dtype), v)
  out = out / denom
  if mask is not None:
    out = out * jnp.any(mask, axis=-1)[:, None, None, None]
  return out.astype(v.dtype)


class Attention(nnx.Module):
  """Multi-head attention; self-attention when `context` is None.

  The query comes from `x` [B, T, D]; keys and values from `context`
  [B, S, Dc] (or `x`). `mask` is a boolean [B, S] key-validity mask, so padded
  text tokens and dropped (unconditional) captions are simply not attended.
  Keys/values can be precomputed once with `kv()` (heads-major
  [B, H, S, K]) and passed as `cached_kv`: the sampler does this for the
  text, which does not change across steps.
  """

  def __init__(
      self,
      features: int,
      num_heads: int,
      *,
      rngs: nnx.Rngs,
      context_features: int | None = None,
      head_dim: int | None = None,
      use_bias: bool = True,
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
  ):
    if head_dim is None:
      if features % num_heads:
        raise ValueError(
            f"features={features} is not divisible by num_heads={num_heads}")
      head_dim = features // num_heads
    ctx = context_features or features
    kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.dtype = dtype
    # Projected to [B, T, H, K], then swapped to heads-major: XLA:CPU
    # otherwise computes the heads-major product transposed and fuses the
    # LayerNorm into a transposed copy of its input (sampling at config S:
    # ~5% slower).
    self.query = Einsum(
        "btd,dhk->bthk", (features, num_heads, head_dim),
        ("embed", "heads", "kv"), bias_ndim=2, **kw)
    self.key = Einsum(
        "bsd,dhk->bshk", (ctx, num_heads, head_dim),
        ("embed", "heads", "kv"), bias_ndim=2, **kw)
    self.value = Einsum(
        "bsd,dhk->bshk", (ctx, num_heads, head_dim),
        ("embed", "heads", "kv"), bias_ndim=2, **kw)
    self.out = Einsum(
        "bhtk,hkd->btd", (num_heads, head_dim, features),
        ("heads", "kv", "embed"), fan_in_ndim=2, **kw)

  def kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, H, S, K] of `context` [B, S, Dc]."""
    return (jnp.swapaxes(self.key(context), 1, 2),
            jnp.swapaxes(self.value(context), 1, 2))

  def output_without_keys(self, shape: tuple[int, ...]) -> jax.Array:
    """What a query with no valid key gets: the output bias (or zeros)."""
    if self.out.bias is None:
      return jnp.zeros(shape, self.dtype)
    return jnp.broadcast_to(self.out.bias[...].astype(self.dtype), shape)

  def __call__(
      self,
      x: jax.Array,
      context: jax.Array | None = None,
      mask: jax.Array | None = None,
      cached_kv: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    # Pre-scaled for `attend`.
    q = jnp.swapaxes(self.query(x, scale=self.head_dim**-0.5), 1, 2)
    if cached_kv is not None:
      k, v = cached_kv
    else:
      k, v = self.kv(x if context is None else context)
    return self.out(attend(q, k.astype(self.dtype), v.astype(self.dtype),
                           mask))
