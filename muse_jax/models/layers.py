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
  a_rows, g_rows = _split_leading_rows(sa, out, a, g)
  db = jnp.einsum(f"{sa},{out}->{sb}", a_rows, g_rows,
                  preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


def _split_leading_rows(sa: str, out: str, a: jax.Array, g: jax.Array):
  """`a` and `g` with a lone leading row axis split in two, when that helps.

  The weight gradient of "...d,df->...f" on 2-D rows contracts both
  operands over their leading axis. XLA:CPU's bf16 matrix kernel (YNNPACK)
  does not take such an operand, so XLA runs that product in float32 on its
  fallback kernel (4x slower at config S); contracting two axes instead
  makes XLA transpose the operands into the kernel's layout. `sa` and
  `out` are the subscripts of `a` and of the product's output.
  """
  if (sa.startswith("...") and out.startswith("...") and a.ndim == 2
      and g.ndim == 2 and a.shape[0] % 2 == 0):
    return (a.reshape(2, a.shape[0] // 2, a.shape[1]),
            g.reshape(2, g.shape[0] // 2, g.shape[1]))
  return a, g


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

  Low-precision (bf16) inputs go through `_attention_core`, whose own
  backward pass keeps every product in bf16; float32 inputs are
  differentiated by JAX (on CPU that measured faster for float32).
  """
  if q.dtype != jnp.float32:
    return _attend_low_precision(q, k, v, mask)
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


def _attend_low_precision(q, k, v, mask):
  """`attend` on [B*H, T|S, K] through `_attention_core`.

  Merging batch and heads is not only a reshape: XLA:CPU runs a bf16
  product in float32 (3-4x slower) when an operand arrives as a transposed
  view, which the heads-major swap of q/k/v is; the merged copy is laid out
  the way its bf16 kernel takes.
  """
  b, h, t, kd = q.shape
  s = k.shape[2]
  valid = None
  if mask is not None:
    valid = jnp.broadcast_to(mask[:, None, None, :], (b, h, 1, s))
    valid = valid.reshape(b * h, 1, s)
  out = _attention_core(h, q.reshape(b * h, t, kd), k.reshape(b * h, s, kd),
                        v.reshape(b * h, s, v.shape[-1]), valid)
  out = out.reshape(b, h, t, v.shape[-1])
  if mask is not None:
    out = out * jnp.any(mask, axis=-1)[:, None, None, None].astype(out.dtype)
  return out


def _scores(q, k, valid):
  scores = jnp.einsum("ntk,nsk->nts", q, k, preferred_element_type=jnp.float32)
  return scores if valid is None else jnp.where(valid, scores, _NEG_INF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(heads, q, k, v, valid):
  """Softmax attention [N, T, K] x [N, S, K] -> [N, T, K] in v's dtype.

  N = batch * `heads` (batch-major). The backward pass recomputes the
  probabilities from the saved log-normaliser, as flash attention does,
  and lays every product out as [N, rows, contraction] x [N, contraction,
  cols] so that XLA:CPU keeps it in bf16 (see `_key_major`).
  """
  return _attention_core_fwd(heads, q, k, v, valid)[0]


def _attention_core_fwd(heads, q, k, v, valid):
  del heads
  scores = _scores(q, k, valid)
  top = jnp.max(scores, axis=-1, keepdims=True)
  unnormalised = jnp.exp(scores - top)
  denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
  out = jnp.einsum("nts,nsk->ntk", unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / denom
  out = out.astype(v.dtype)
  return out, (q, k, v, valid, out, top + jnp.log(denom))


def _key_major(x: jax.Array, heads: int) -> jax.Array:
  """float32 [N, T, S] -> [B, H, S, T], the left operand of dk and dv.

  XLA:CPU runs a bf16 product in float32 when an operand reaches it as a
  transposed view. Transposing in float32, splitting N back into (batch,
  heads) and rounding afterwards hands the product a laid-out bf16 array.
  """
  n, t, s = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(n // heads, heads, s, t)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
  """[N, T, K] -> [B, H, T, K], the right operand of dk and dv.

  The barrier stops XLA from merging this reshape with the one that made
  the residual, which would hand the product the transposed view again.
  """
  n, t, k = x.shape
  return jax.lax.optimization_barrier(x).reshape(n // heads, heads, t, k)


def _attention_core_bwd(heads, residuals, g):
  q, k, v, valid, out, log_norm = residuals
  dtype = v.dtype
  g = g.astype(dtype)
  # d/dscores of softmax: P * (dP - rowsum(dO * O)).
  row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                keepdims=True)
  probs = jnp.exp(_scores(q, k, valid) - log_norm)
  dprobs = jnp.einsum("ntk,nsk->nts", g, v, preferred_element_type=jnp.float32)
  dscores = probs * (dprobs - row)
  dq = jnp.einsum("nts,nsk->ntk", dscores.astype(dtype), k,
                  preferred_element_type=jnp.float32)
  dv = jnp.einsum("bhst,bhtk->bhsk", _key_major(probs, heads).astype(dtype),
                  _split_heads(g, heads), preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhst,bhtk->bhsk", _key_major(dscores, heads).astype(dtype),
                  _split_heads(q, heads), preferred_element_type=jnp.float32)
  return (dq.astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
          dv.reshape(v.shape).astype(v.dtype), None)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


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
