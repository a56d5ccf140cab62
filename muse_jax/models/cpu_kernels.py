"""XLA:CPU-specific forms of the layers' products and attention.

Selected with `matmul_impl="xla_cpu"` / `attention_impl="xla_cpu"` (the
benchmarks and the CPU demo do); the default `"plain"` path in
`muse_jax.models.layers` is ordinary JAX. Everything here computes the same
function as the plain path (tests/test_layers.py holds the two to each other)
and exists only because XLA:CPU runs the plain forms slower:

* `einsum_f32`: products take operands in the compute dtype and accumulate
  and return float32; for bf16 operands a custom VJP rounds the cotangent to
  bf16 so the backward products also take bf16 operands (autodiff of a
  float32-output product multiplies in float32, 3-4x slower on CPUs with
  AMX). `_split_leading_rows` hands the MLP's row weight gradient to the
  bf16 kernel in a layout it takes.
* `attend`: softmax attention on heads-major [B, H, T, K] with pre-scaled
  queries, normalised after the value product (the score tensor is the
  largest one attention makes and every pass over it is memory-bound);
  bf16 inputs go through `_attention_core`, with its own backward pass on
  [B*H, T, K] (flash-style recomputation from the log-normaliser; dk/dv
  from key-major copies transposed in float32, behind an optimisation
  barrier), because XLA:CPU's bf16 kernel takes no transposed view.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG_INF = -1e9


def parse_einsum(eqn: str) -> tuple[str, str, str]:
  """"ab,bc->ac" -> ("ab", "bc", "ac")."""
  inputs, out = eqn.replace(" ", "").split("->")
  a, b = inputs.split(",")
  return a, b, out


def _grads_are_einsums(eqn: str) -> bool:
  """Whether both operand gradients are plain einsums of the other two."""
  a, b, out = parse_einsum(eqn)
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
  sa, sb, out = parse_einsum(eqn)
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
  operands (the output cotangent is rounded to the operands' dtype).
  """
  if a.dtype == jnp.float32 or not _grads_are_einsums(eqn):
    return jnp.einsum(eqn, a, b, preferred_element_type=jnp.float32)
  return _einsum_f32_out(eqn, a, b)


def dense(eqn: str, x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
          dtype) -> jax.Array:
  """A layer's product: accumulate and add the bias in f32, round once."""
  y = einsum_f32(eqn, x.astype(dtype), kernel.astype(dtype))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention of pre-scaled queries, heads-major [B, H, T|S, K].

  Scores and the softmax statistics are float32; the normalisation is
  applied to the [B, H, T, K] output rather than to the [B, H, T, S]
  weights. `mask` [B, S] marks valid keys; a row with no valid key attends
  nothing (zeros), as in the plain path.
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
