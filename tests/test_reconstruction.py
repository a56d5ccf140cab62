"""Tests of the reconstruction metrics and the k-means patch baseline."""

import numpy as np
import pytest

from muse_jax.evaluation import kmeans_baseline
from muse_jax.evaluation import reconstruction


def test_psnr_of_identical_images_is_capped():
  x = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3))
  np.testing.assert_array_equal(reconstruction.psnr(x, x),
                                [reconstruction.MAX_PSNR_DB] * 3)
  assert reconstruction.MAX_PSNR_DB == pytest.approx(100.0)


def test_psnr_of_a_known_error():
  ref = np.zeros((2, 4, 4, 3))  # 0.5 on [0, 1].
  rec = np.full((2, 4, 4, 3), 0.2)  # 0.6 on [0, 1]: MSE 0.01, 20 dB.
  rec[1] = -0.02  # 0.49: MSE 1e-4, 40 dB.
  np.testing.assert_allclose(reconstruction.psnr(ref, rec), [20.0, 40.0])
  # The mean of per-image PSNRs, not the PSNR of the mean MSE.
  assert reconstruction.mean_psnr(ref, rec) == pytest.approx(30.0)
  # Both sides are clipped to [-1, 1] first.
  over = np.full((1, 2, 2, 3), 1.7)
  assert reconstruction.psnr(over, np.ones_like(over))[0] == pytest.approx(
      100.0)
  assert reconstruction.psnr(-over, np.zeros_like(over))[0] == pytest.approx(
      10 * np.log10(4.0))


def test_psnr_names_bad_inputs():
  x = np.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match=r"reconstruction shape \(1, 4, 2, 3\)"):
    reconstruction.psnr(x, x[:, :, :2])
  with pytest.raises(ValueError, match="reference must be images"):
    reconstruction.psnr(x[0], x[0])
  with pytest.raises(ValueError, match="reconstruction contains NaN"):
    reconstruction.psnr(x, x * np.nan)


def test_usage_and_perplexity_of_hand_made_ids():
  ids = np.array([[0, 0], [1, 1]])
  assert reconstruction.codebook_usage(ids, 4) == 0.5
  assert reconstruction.perplexity(ids, 4) == pytest.approx(2.0)
  assert reconstruction.codebook_usage([3, 3, 3], 4) == 0.25
  assert reconstruction.perplexity([3, 3, 3], 4) == pytest.approx(1.0)
  assert reconstruction.perplexity(np.arange(8), 8) == pytest.approx(8.0)
  # p = (3/4, 1/4): exp(-(3/4 ln 3/4 + 1/4 ln 1/4)).
  assert reconstruction.perplexity([0, 0, 0, 1], 2) == pytest.approx(
      np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))
  with pytest.raises(ValueError, match=r"span \[0, 4\].*\[0, 4\)"):
    reconstruction.codebook_usage([0, 4], 4)
  with pytest.raises(ValueError, match="float"):
    reconstruction.perplexity(np.array([0.0, 1.0]), 4)


def test_report_gathers_the_metrics():
  x = np.zeros((2, 8, 8, 3))
  r = reconstruction.report(x, x, ids=np.array([0, 1, 2, 3]),
                            codebook_size=8)
  assert r == reconstruction.ReconstructionReport(
      psnr=100.0, num_images=2, codebook_usage=0.5, perplexity=4.0,
      codebook_size=8)
  assert reconstruction.report(x, x).codebook_usage is None
  with pytest.raises(ValueError, match="codebook_size"):
    reconstruction.report(x, x, ids=[0])


def _toy_images(n=16, seed=0):
  """Images tiled with 4 distinct random 8x8x3 patches."""
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(-1, 1, (4, 8 * 8 * 3)).astype(np.float32)
  which = np.arange(n * 4 * 4) % 4  # Every pattern equally often.
  rng.shuffle(which)
  patches = patterns[which].reshape(n, 4, 4, -1)
  return kmeans_baseline.from_patches(patches, 8), which.reshape(n, 4, 4)


def test_patches_round_trip():
  x = np.random.default_rng(0).normal(size=(2, 16, 24, 3))
  p = kmeans_baseline.to_patches(x, 8)
  assert p.shape == (2, 2, 3, 192)
  np.testing.assert_array_equal(p[1, 1, 2], x[1, 8:16, 16:24].ravel())
  np.testing.assert_array_equal(kmeans_baseline.from_patches(p, 8), x)
  with pytest.raises(ValueError, match="16x20.*patch size 8"):
    kmeans_baseline.to_patches(x[:, :, :20], 8)


@pytest.mark.parametrize("k", [4, 6])
def test_kmeans_reconstructs_obvious_clusters_exactly(k):
  images, which = _toy_images()
  config = kmeans_baseline.KMeansConfig(codebook_size=k, iterations=10,
                                        chunk=64)
  codebook, stats = kmeans_baseline.fit(images, config)
  # The MSE comes from |c|^2 - 2 x.c + |x|^2 in float32: ~1e-7 noise.
  assert stats.num_patches == 256 and stats.mse[-1] < 1e-6
  ids = codebook.encode(images)
  assert ids.shape == (16, 4, 4)
  # Tokens are the patterns up to a relabelling.
  assert len({(a, b) for a, b in zip(ids.ravel(), which.ravel())}) == 4
  rec = codebook.decode(ids)
  np.testing.assert_allclose(rec, images, atol=1e-6)
  result = kmeans_baseline.evaluate(codebook, images)
  assert result.psnr > 90
  assert result.codebook_usage == 4 / k
  assert result.perplexity == pytest.approx(4.0)


def test_kmeans_names_bad_settings():
  images, _ = _toy_images(n=1)
  with pytest.raises(ValueError, match="16 patches .* codebook of 32"):
    kmeans_baseline.fit(images, kmeans_baseline.KMeansConfig(codebook_size=32))
  codebook = kmeans_baseline.PatchCodebook(np.zeros((4, 192), np.float32), 8)
  with pytest.raises(ValueError, match=r"span \[0, 7\]"):
    codebook.decode(np.array([[[0, 7]]]))


def test_references_are_exact_on_images_they_can_represent():
  rng = np.random.default_rng(0)
  blocks = rng.uniform(-1, 1, (2, 2, 3, 1, 1, 3))
  flat = np.broadcast_to(blocks, (2, 2, 3, 8, 8, 3))
  images = kmeans_baseline.from_patches(
      flat.reshape(2, 2, 3, 192).copy(), 8)
  np.testing.assert_allclose(
      kmeans_baseline.patch_mean_reconstruction(images), images, atol=1e-6)
  constant = np.full((1, 32, 32, 3), 0.3, np.float32)
  np.testing.assert_allclose(
      kmeans_baseline.bilinear_reconstruction(constant), constant, atol=1e-6)
  assert kmeans_baseline.bilinear_reconstruction(images).shape == images.shape
