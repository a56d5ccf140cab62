"""FLOP counts: XLA cost analysis, corrected for loops, and an analytic count.

XLA's cost analysis counts the body of a `while` loop once, whatever its
trip count: a `lax.scan` over layers is counted as one layer and the
sampler's `fori_loop` over decoding steps as one step. We therefore report

- `xla_flops_raw`: the cost analysis of the compiled program as it runs
  (loop bodies counted once: an under-count, kept for reference);
- `flops`: XLA's cost analysis of the same computation without loops,
  lowered (not compiled) from a model built with `scan_layers=False`; for
  the sampler, the one-time text keys/values plus `num_steps` transformer
  forwards (features at 2B, cross-attention for the B rows with text, the
  output layer on the guided features at B; the per-step sampling
  arithmetic on the logits is left out);
- `flops_matmul`: the analytic count of the matrix products below (2 FLOPs
  per multiply-add), the same formula the peers' measured counts are
  compared with (they count matmul-class ops with torch's FlopCounterMode).

XLA's count also includes element-wise work (norms, softmax, GELU, the
optimizer), so it is slightly above the matmul count.
"""

from __future__ import annotations

from typing import Any


def xla_flops(stage: Any) -> float:
  """'flops' of a jax `Lowered` or `Compiled` object's cost analysis."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    return float(sum(c.get("flops", 0.0) for c in cost))
  return float(cost.get("flops", 0.0))


def text_matmul_flops(*, batch: int, text_len: int, text_dim: int,
                      width: int, depth: int) -> float:
  """Text projection plus every layer's cross-attention keys and values."""
  proj = 2 * text_len * text_dim * width
  kv = depth * 2 * (2 * text_len * width * width)
  return float(batch * (proj + kv))


def image_matmul_flops(*, batch: int, seq_len: int, text_len: int,
                       width: int, depth: int, mlp_dim: int,
                       codebook_size: int, output_batch: int | None = None,
                       text_batch: int | None = None) -> float:
  """One forward over the image tokens, given the text keys/values.

  Per layer and token: q,k,v,out of self-attention (8 d^2), scores and
  weighted values (4 N d), cross-attention q and out (4 d^2), its scores and
  values over L text tokens (4 L d), and the MLP (4 d m). Head: d x d dense
  and the d x codebook output layer. Our guided sampler runs the output
  layer on the guided features only (`output_batch` = B of the 2B rows) and
  cross-attention only for the rows with text (`text_batch`).
  """
  n, d = seq_len, width
  own = 8 * d * d + 4 * n * d + 4 * d * mlp_dim
  cross = 4 * d * d + 4 * text_len * d
  out_b = batch if output_batch is None else output_batch
  text_b = batch if text_batch is None else text_batch
  return float(depth * n * (batch * own + text_b * cross)
               + batch * n * 2 * d * d + out_b * n * 2 * d * codebook_size)


def ours_sample_matmul_flops(cfg, batch: int, steps: int,
                             guidance: bool = True) -> float:
  """Our sampler: text keys/values of the B prompts once, then `steps`
  forwards at 2B with guidance (cross-attention and the output layer at
  B: the unconditional rows attend no text)."""
  text = text_matmul_flops(batch=batch, text_len=cfg.text_len,
                           text_dim=cfg.text_dim, width=cfg.width,
                           depth=cfg.depth)
  return text + steps * image_matmul_flops(
      batch=2 * batch if guidance else batch, seq_len=cfg.seq_len,
      text_len=cfg.text_len, width=cfg.width, depth=cfg.depth,
      mlp_dim=cfg.mlp_dim, codebook_size=cfg.codebook_size,
      output_batch=batch, text_batch=batch)


def ours_train_matmul_flops(cfg, batch: int) -> float:
  """Forward (text included) plus backward (twice the forward)."""
  fwd = text_matmul_flops(batch=batch, text_len=cfg.text_len,
                          text_dim=cfg.text_dim, width=cfg.width,
                          depth=cfg.depth) + image_matmul_flops(
      batch=batch, seq_len=cfg.seq_len, text_len=cfg.text_len,
      width=cfg.width, depth=cfg.depth, mlp_dim=cfg.mlp_dim,
      codebook_size=cfg.codebook_size)
  return 3.0 * fwd
