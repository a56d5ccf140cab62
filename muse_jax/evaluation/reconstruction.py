"""Reconstruction metrics shared by tokenizers and their baselines.

One definition of PSNR, codebook usage and perplexity for every image
tokenizer in the project (the VQGAN, the k-means patch codebook in
`kmeans_baseline`, trivial references), so their numbers compare:

* Images are float arrays in the tokenizer's range [-1, 1], [B, H, W, C].
  Both the reference and the reconstruction are clipped to [-1, 1] and mapped
  to [0, 1] (no rounding to uint8), then PSNR = 10 log10(1 / MSE) with the
  MSE over one image's pixels and channels. The reported PSNR is the mean
  over images of the per-image PSNR (not the PSNR of the mean MSE). An MSE
  below 1e-10 counts as 1e-10, so identical images score `MAX_PSNR_DB`
  (100 dB) rather than infinity and a mean stays finite.
* Token ids are integers in [0, K) for a codebook of K entries, any shape.
  Codebook usage is the fraction of the K entries that occur at least once;
  perplexity is exp of the entropy (nats) of the ids' empirical
  distribution: K when all entries are equally frequent, 1 when one entry
  takes every token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

MIN_MSE = 1e-10
MAX_PSNR_DB = float(10 * np.log10(1 / MIN_MSE))  # 100 dB.


def _unit_interval(images: Any, name: str) -> np.ndarray:
  x = np.asarray(images, dtype=np.float64)
  if x.ndim != 4:
    raise ValueError(f"{name} must be images [B, H, W, C], got shape "
                     f"{x.shape}.")
  if not np.isfinite(x).all():
    raise ValueError(f"{name} contains NaN or infinite values.")
  return (np.clip(x, -1.0, 1.0) + 1.0) / 2.0


def psnr(reference: Any, reconstruction: Any) -> np.ndarray:
  """Per-image PSNR in dB of images in [-1, 1], float64 [B].

  Both are clipped to [-1, 1] and mapped to [0, 1]; peak signal 1. At most
  `MAX_PSNR_DB` (identical images).
  """
  ref = _unit_interval(reference, "reference")
  rec = _unit_interval(reconstruction, "reconstruction")
  if ref.shape != rec.shape:
    raise ValueError(f"reconstruction shape {rec.shape} differs from "
                     f"reference shape {ref.shape}.")
  mse = ((ref - rec) ** 2).mean(axis=(1, 2, 3))
  return 10.0 * np.log10(1.0 / np.maximum(mse, MIN_MSE))


def mean_psnr(reference: Any, reconstruction: Any) -> float:
  """Mean over images of `psnr` (the project's reported PSNR)."""
  return float(psnr(reference, reconstruction).mean())


def token_counts(ids: Any, codebook_size: int) -> np.ndarray:
  """How often each of the `codebook_size` entries occurs in `ids`, [K]."""
  if codebook_size < 1:
    raise ValueError(f"codebook_size must be >= 1, got {codebook_size}.")
  ids = np.asarray(ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token ids must be integers, got dtype {ids.dtype}.")
  ids = ids.ravel()
  if ids.size == 0:
    raise ValueError("no token ids to count.")
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0 or hi >= codebook_size:
    raise ValueError(f"token ids span [{lo}, {hi}], outside the codebook "
                     f"[0, {codebook_size}).")
  return np.bincount(ids, minlength=codebook_size)


def codebook_usage(ids: Any, codebook_size: int) -> float:
  """Fraction of the codebook's entries that occur in `ids`."""
  return float((token_counts(ids, codebook_size) > 0).mean())


def perplexity(ids: Any, codebook_size: int) -> float:
  """exp(entropy) of the empirical distribution of `ids`, in [1, K]."""
  counts = token_counts(ids, codebook_size)
  p = counts[counts > 0] / counts.sum()
  return float(np.exp(-(p * np.log(p)).sum()))


@dataclasses.dataclass(frozen=True)
class ReconstructionReport:
  """A tokenizer's (or baseline's) reconstruction of a fixed image set."""
  psnr: float  # Mean per-image PSNR, dB.
  num_images: int
  codebook_usage: float | None = None  # None for non-codebook methods.
  perplexity: float | None = None
  codebook_size: int | None = None

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def report(reference: Any, reconstruction: Any, ids: Any = None,
           codebook_size: int | None = None) -> ReconstructionReport:
  """PSNR, and with `ids` codebook usage and perplexity, in one record."""
  value = mean_psnr(reference, reconstruction)
  n = int(np.shape(reference)[0])
  if ids is None:
    return ReconstructionReport(psnr=value, num_images=n)
  if codebook_size is None:
    raise ValueError("codebook_size is required with ids.")
  return ReconstructionReport(
      psnr=value, num_images=n,
      codebook_usage=codebook_usage(ids, codebook_size),
      perplexity=perplexity(ids, codebook_size),
      codebook_size=int(codebook_size))
