"""Transformer building blocks shared by the masked transformers and MiniLM.

Every parameter is annotated with *logical* axis names (see
`muse_jax.sharding.LOGICAL_AXES`); a rules table in the config maps them onto
mesh axes, so the same module code runs replicated on a laptop and FSDP/tensor
sharded on a pod. Parameters live in `param_dtype`; matmuls run in `dtype`;
layer norms and the attention softmax always run in float32, because bf16
statistics are where masked-token training goes unstable first.

Two implementations compute the same functions. `"plain"` (the default) is
ordinary JAX: `jnp.einsum` in the compute dtype and
`jax.nn.dot_product_attention` on [B, T, H, K], what XLA's TPU and GPU
backends expect. `"xla_cpu"` (`impl=` of `Einsum`/`Attention`; the configs'
`matmul_impl` / `attention_impl`) routes the products and attention through
`muse_jax.models.cpu_kernels`, which XLA:CPU runs faster. Parameters are the
same in both, so a checkpoint trained with one runs with the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from muse_jax.models import cpu_kernels
from muse_jax.models import multi_axis as multi_axis_lib

Dtype = jnp.dtype | type

IMPLS = ("plain", "xla_cpu")


def _init(initializer, axes: Sequence[str | None]):
  return nnx.with_partitioning(initializer, tuple(axes))


def _vector(init_value: float, features: int, axis_name: str,
            param_dtype: Dtype) -> nnx.Param:
  """A constant-initialised [features] parameter on one logical axis."""
  init = nnx.initializers.constant(init_value)
  return nnx.Param(_init(init, (axis_name,))(None, (features,), param_dtype))


def check_impl(name: str, value: str) -> None:
  """Raises ValueError naming `name` unless `value` is a known impl."""
  if value not in IMPLS:
    raise ValueError(f"{name}={value!r} not in {IMPLS}")


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
      impl: str = "plain",
  ):
    check_impl("Einsum impl", impl)
    if len(shape) != len(axes):
      raise ValueError(f"Einsum {eqn!r}: shape {shape} vs axes {axes}")
    _, kernel_subs, out = cpu_kernels.parse_einsum(eqn)
    if use_bias and not out.endswith(kernel_subs[-bias_ndim:]):
      raise ValueError(f"Einsum {eqn!r}: the bias axes "
                       f"{kernel_subs[-bias_ndim:]!r} must end the output")
    self.eqn = eqn
    self.dtype = dtype
    self.impl = impl
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
    bias = None if self.bias is None else self.bias[...]
    if scale is not None:
      kernel = kernel * scale
      bias = None if bias is None else bias * scale
    if self.impl == "xla_cpu":
      return cpu_kernels.dense(self.eqn, x, kernel, bias, self.dtype)
    y = jnp.einsum(self.eqn, x.astype(self.dtype), kernel.astype(self.dtype))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    return y


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
    self.scale = _vector(1.0, features, axis_name, param_dtype)
    self.bias = (_vector(0.0, features, axis_name, param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMS normalisation computed in float32, with a learned scale."""

  def __init__(
      self,
      features: int,
      *,
      rngs: nnx.Rngs,
      eps: float = 1e-6,
      axis_name: str = "embed",
      dtype: Dtype = jnp.float32,
      param_dtype: Dtype = jnp.float32,
  ):
    del rngs  # Deterministic init; the argument keeps constructors uniform.
    self.eps = eps
    self.dtype = dtype
    self.scale = _vector(1.0, features, axis_name, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                            + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


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
      impl: str = "plain",
  ):
    kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype,
              param_dtype=param_dtype, impl=impl)
    self.approximate_gelu = approximate_gelu
    self.wi = Einsum("...d,df->...f", (features, hidden), ("embed", "mlp"), **kw)
    self.wo = Einsum("...f,fd->...d", (hidden, features), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.wi(x), approximate=self.approximate_gelu)
    return self.wo(h)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention on [B, T|S, H, K] (the plain path).

  `jax.nn.dot_product_attention` (float32 scores and softmax), except that
  a query row with no valid key attends nothing: its output is zero, not
  an average over padding, so a dropped caption is exactly unconditional.
  `mask` [B, S] marks valid keys.
  """
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
  return out * jnp.any(mask, axis=-1)[:, None, None, None].astype(out.dtype)


class Attention(nnx.Module):
  """Multi-head attention; self-attention when `context` is None.

  The query comes from `x` [B, T, D]; keys and values from `context`
  [B, S, Dc] (or `x`). `mask` is a boolean [B, S] key-validity mask, so padded
  text tokens and dropped (unconditional) captions are simply not attended.
  Keys/values can be precomputed once with `kv()` and passed as
  `cached_kv`: the sampler does this for the conditioning context, which
  does not change across steps. q/k/v are projected to [B, T, H, K]; the
  `"xla_cpu"` impl swaps them to heads-major for `cpu_kernels.attend`, so
  its cached keys/values are [B, H, S, K]. `qk_norm` RMS-normalises every
  head's queries and keys before their product (QK-norm, Dehghani et al.
  2023, here in its RMS form): the attention logits cannot grow without
  bound, which keeps training stable at learning rates where plain
  attention collapses.

  `multi_axis=(grid_h, grid_w, window)` makes self-attention over a
  grid_h x grid_w image (tokens in raster order) multi-axis attention
  (`muse_jax.models.multi_axis`: half the heads within window x window
  blocks, half within a dilated grid), which never forms the [T, T] scores.
  The parameters are those of full attention, so a checkpoint serves
  either; cross-attention (a `context` or `cached_kv`) stays full.
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
      impl: str = "plain",
      matmul_impl: str | None = None,
      qk_norm: bool = False,
      multi_axis: tuple[int, int, int] | None = None,
  ):
    """`impl` picks the attention core; `matmul_impl` (default: `impl`)
    the projections' products."""
    check_impl("Attention impl", impl)
    if head_dim is None:
      if features % num_heads:
        raise ValueError(
            f"features={features} is not divisible by num_heads={num_heads}")
      head_dim = features // num_heads
    if multi_axis is not None:
      grid_h, grid_w, window = (int(n) for n in multi_axis)
      multi_axis_lib.check((grid_h, grid_w), window, num_heads)
      multi_axis = (grid_h, grid_w, window)
    ctx = context_features or features
    kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype,
              param_dtype=param_dtype, impl=matmul_impl or impl)
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.dtype = dtype
    self.impl = impl
    self.multi_axis = multi_axis
    self.query = Einsum(
        "btd,dhk->bthk", (features, num_heads, head_dim),
        ("embed", "heads", "kv"), bias_ndim=2, **kw)
    self.key = Einsum(
        "bsd,dhk->bshk", (ctx, num_heads, head_dim),
        ("embed", "heads", "kv"), bias_ndim=2, **kw)
    self.value = Einsum(
        "bsd,dhk->bshk", (ctx, num_heads, head_dim),
        ("embed", "heads", "kv"), bias_ndim=2, **kw)
    out_eqn = "bhtk,hkd->btd" if impl == "xla_cpu" else "bthk,hkd->btd"
    self.out = Einsum(
        out_eqn, (num_heads, head_dim, features),
        ("heads", "kv", "embed"), fan_in_ndim=2, **kw)
    norm_kw = dict(rngs=rngs, axis_name="kv", dtype=dtype,
                   param_dtype=param_dtype)
    self.query_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None
    self.key_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None

  def kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values of `context` [B, S, Dc], in this impl's layout."""
    k, v = self.key(context), self.value(context)
    if self.key_norm is not None:
      k = self.key_norm(k)
    if self.impl == "xla_cpu":
      return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return k, v

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
    multi_axis = (self.multi_axis is not None and context is None
                  and cached_kv is None)
    if cached_kv is not None:
      k, v = cached_kv
    else:
      k, v = self.kv(x if context is None else context)
    k, v = k.astype(self.dtype), v.astype(self.dtype)
    scale = self.head_dim**-0.5
    if self.query_norm is None:
      q = self.query(x, scale=scale) if self.impl == "xla_cpu" else (
          self.query(x))
    else:
      q = self.query_norm(self.query(x))
      if self.impl == "xla_cpu":
        q = q * jnp.asarray(scale, q.dtype)
    if multi_axis:
      return self._multi_axis(q, k, v, mask)
    if self.impl == "xla_cpu":
      # Pre-scaled queries, heads-major.
      return self.out(cpu_kernels.attend(jnp.swapaxes(q, 1, 2), k, v, mask))
    return self.out(dot_product_attention(q, k, v, mask))

  def _multi_axis(self, q, k, v, mask) -> jax.Array:
    """Multi-axis self-attention of q [B, T, H, K] and this impl's k/v."""
    grid_h, grid_w, window = self.multi_axis
    kw = dict(grid=(grid_h, grid_w), window=window, mask=mask)
    if self.impl == "plain":
      return self.out(multi_axis_lib.attend(q, k, v, **kw))
    # "xla_cpu": pre-scaled queries; keys/values back to [B, S, H, K] (XLA
    # cancels the swaps), every group attended heads-major by the kernel.
    def core(q, k, v):
      heads_major = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
      return jnp.swapaxes(cpu_kernels.attend(*heads_major), 1, 2)

    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    out = multi_axis_lib.attend(q, k, v, core=core, **kw)
    return self.out(jnp.swapaxes(out, 1, 2))


# --- Layer stacks. ---


def stacked(make: Callable[[nnx.Rngs], nnx.Module], depth: int,
            rngs: nnx.Rngs) -> nnx.Module:
  """`depth` layers `make(rngs)` as one module whose parameters carry a
  leading "layers" axis (each layer with its own random init): what
  `apply_stacked` scans over, one compiled layer body for any depth."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(rngs):
    return make(rngs)

  return build(rngs)


def apply_stacked(stack: nnx.Module, body: Callable[..., jax.Array],
                  x: jax.Array, per_layer: Any = (), *, scan: bool = True,
                  remat_policy: Callable[..., Any] | None = None,
                  remat: bool = False) -> jax.Array:
  """x after `body(layer, x, *inputs)` for every layer of a `stacked` stack.

  `per_layer` is a tuple of arrays with a leading layer axis (e.g. each
  layer's cross-attention keys); layer i gets their i-th slices. `scan`
  runs one `jax.lax.scan` (else an unrolled Python loop, same values);
  `remat` recomputes each layer in the backward pass, saving what
  `remat_policy` allows (`jax.checkpoint`'s policy; None saves nothing).
  """
  graphdef, state = nnx.split(stack)

  def step(h, xs):
    layer_state, inputs = xs
    return body(nnx.merge(graphdef, layer_state), h, *inputs), None

  if remat:
    step = jax.checkpoint(step, policy=remat_policy)
  if scan:
    x, _ = jax.lax.scan(step, x, (state, tuple(per_layer)))
    return x
  depth = jax.tree.leaves(state)[0].shape[0]
  for i in range(depth):
    x, _ = step(x, jax.tree.map(lambda a, i=i: a[i],
                                (state, tuple(per_layer))))
  return x
