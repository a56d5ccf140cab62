"""FID against pytorch-fid: the Inception network, its weights file, the
resize and the Frechet distance.

tests/golden/inception_fid_golden.npz comes from the reference
`pytorch_fid` package (scripts/make_inception_golden.py) run on random
weights in the layout of its `pt_inception-2015-12-05-6726825d.pth`; the
tests rebuild the same weights from the seed, write them as a torch file
(`torch_files.save`, which torch.load reads exactly: checked by the
script) and load that file as users load the real one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from muse_jax import sharding
from muse_jax.evaluation import fid
from muse_jax.evaluation import inception
from muse_jax.evaluation import inception_layout
from muse_jax.interop import torch_files

GOLDEN = os.path.join(os.path.dirname(__file__), "golden",
                      "inception_fid_golden.npz")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def weights_file(golden, tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / inception_layout.WEIGHTS_FILE
  torch_files.save(inception_layout.random_state_dict(int(golden["seed"])),
                   path)
  return str(path)


@pytest.fixture(scope="module")
def extractor(weights_file):
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  return fid.Extractor(inception.from_file(weights_file), mesh, rules,
                       batch_size=16)


@pytest.fixture(scope="module")
def plain_extractor(weights_file):
  """Unsharded: one device runs the whole batch (faster on 2 cores than 8
  fake devices)."""
  return fid.Extractor(inception.from_file(weights_file), batch_size=16)


def test_pool3_features_match_pytorch_fid(extractor, golden):
  assert len(golden["small"]) >= 16
  for name in ("small", "large"):  # Upsampled and downsampled to 299.
    ours = extractor(golden[name])
    ref = golden[f"{name}_features"]
    assert ours.shape == ref.shape == (len(golden[name]), 2048)
    assert np.abs(ours - ref).max() <= 1e-4, (name, np.abs(ours - ref).max())


def test_frechet_distance_matches_pytorch_fid(golden):
  got = fid.frechet_distance(golden["mu1"], golden["sigma1"], golden["mu2"],
                             golden["sigma2"])
  assert abs(got - golden["fid"]) <= 1e-6 * abs(golden["fid"])


def test_few_images_exact_path_agrees_with_pytorch_fid(golden):
  """Few images (rank-deficient 2048-d covariances): the exact singular-
  value path against pytorch-fid's `sqrtm` of a singular product, which
  scipy computes only to ~1e-5 relative (it warns so)."""
  small = golden["small_features"].astype(np.float64)
  other = np.concatenate([golden["large_features"],
                          golden["small_features"][:6]]).astype(np.float64)
  exact = fid.fid_from_features(small, other)
  assert abs(exact - golden["fid_small_large"]) <= 1e-4 * abs(
      golden["fid_small_large"])


def test_exact_and_statistics_paths_agree():
  rng = np.random.default_rng(2)
  a = rng.standard_normal((40, 24)) @ rng.standard_normal((24, 24))
  b = rng.standard_normal((30, 24)) @ rng.standard_normal((24, 24)) + 0.5
  exact = fid.fid_from_features(a, b)
  via_stats = fid.fid_from_features(a, b, max_exact=0)
  assert abs(exact - via_stats) <= 1e-6 * abs(exact)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_perturbation(
    plain_extractor, golden):
  extractor = plain_extractor
  images = golden["small"]
  base = extractor(images)
  assert abs(fid.fid_from_features(base, base)) < 1e-6
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(images.shape)
  scores = []
  for sigma in (4, 16, 48, 128):
    noisy = np.clip(images + sigma * noise, 0, 255).astype(np.uint8)
    scores.append(fid.fid_from_features(base, extractor(noisy)))
  assert all(a < b for a, b in zip(scores, scores[1:])), scores
  assert scores[0] > 0


def test_resize_matches_torch_bilinear_corners_and_modes():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
  up = fid.resize(x)
  assert up.shape == (2, 299, 299, 3) and up.dtype == np.float32
  # align_corners=False: the first output pixel is the first input pixel.
  np.testing.assert_allclose(up[:, 0, 0], x[:, 0, 0] / 255.0, atol=1e-6)
  np.testing.assert_allclose(up[:, -1, -1], x[:, -1, -1] / 255.0, atol=1e-6)
  clean = fid.resize(np.full((1, 32, 32, 3), 200, np.uint8), "clean")
  np.testing.assert_allclose(clean, 200 / 255.0, atol=1e-5)
  with pytest.raises(ValueError, match="'nearest'"):
    fid.resize(x, "nearest")
  with pytest.raises(ValueError, match="uint8"):
    fid.resize(x.astype(np.float32))


def test_statistics_stream_and_round_trip_as_pytorch_fid_npz(tmp_path):
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((50, 8))
  stats = fid.Statistics(8)
  for chunk in np.array_split(feats, 7):
    stats.update(chunk)
  mu, sigma = stats.mu_sigma()
  np.testing.assert_allclose(mu, feats.mean(0), atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), atol=1e-12)
  fid.save_statistics(tmp_path / "ref.npz", mu, sigma)
  mu2, sigma2 = fid.load_statistics(tmp_path / "ref.npz")
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  np.savez(tmp_path / "bad.npz", m=mu)
  with pytest.raises(ValueError, match="not FID statistics"):
    fid.load_statistics(tmp_path / "bad.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    fid.load_statistics(tmp_path / "nope.npz")


def test_missing_weights_name_the_standard_file_and_the_flag(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    inception.from_file(tmp_path / "missing.pth")
  message = str(e.value)
  assert "pt_inception-2015-12-05-6726825d.pth" in message
  assert "--inception_path" in message and "missing.pth" in message


def test_a_wrong_weights_file_names_the_entry(tmp_path):
  sd = inception_layout.random_state_dict(0)
  del sd["Mixed_6b.branch7x7_2.conv.weight"]
  torch_files.save(sd, tmp_path / "w.pth")
  with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.conv.weight"):
    inception.from_file(tmp_path / "w.pth")


def test_torch_files_save_round_trips(tmp_path):
  sd = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "step": np.asarray(7, np.int64), "h": np.ones(3, np.float16)}
  torch_files.save(sd, tmp_path / "s.pth")
  back = torch_files.load(tmp_path / "s.pth")
  assert list(back) == list(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)
